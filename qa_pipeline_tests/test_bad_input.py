"""Bad input never stops the other documents, and every problem names its file."""

from __future__ import annotations

import json
import os
import time

from qa_pipeline.simulator.server import passage_key
from qa_pipeline_tests.conftest import cli_env, run_cli, sql

FAST = {"step_base_ms": 1, "step_per_seq_ms": 0.05, "output_tokens_mean": 30, "output_tokens_max": 200}
RUN = ("run", "--skip-benchmark", "--concurrency", "8", "--max-tokens", "512")

GOOD = {
    "guide.md": "# Guide\n\nThe importer reads one file per minute and keeps a copy for seven days.\n",
    "release notes 2024.md": "# Release notes\n\nVersion 2 adds a retry limit of five attempts per upload.\n",
    "données-éte.md": "# Données d'été\n\nLe service d'export garde trois copies de chaque fichier.\n",
}
# What a user should read next to each bad file's name.
BAD = {
    "scan.txt": "looks binary",
    "empty.md": "is empty",
    "legacy-latin1.txt": "is not valid UTF-8",
    "broken.jsonl": "has no valid record",
    "slides.pdf": "unsupported file type",
}


def write_sources(sources) -> dict[str, list[str]]:
    for name, text in GOOD.items():
        (sources / name).write_text(text, encoding="utf-8")
    (sources / "scan.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    (sources / "empty.md").write_bytes(b"")
    (sources / "legacy-latin1.txt").write_bytes("Le café est payé à l'accueil.\n".encode("latin-1"))
    (sources / "broken.jsonl").write_text('{"content": "no closing brace"\nnot json at all\n[1, 2]\n')
    (sources / "slides.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    partly = [
        json.dumps({"content": "The scheduler starts jobs at midnight.", "metadata": {"chunk_id": "a"}}),
        '{"content": "a line cut short',
        json.dumps({"content": "The scheduler retries a failed job twice.", "metadata": {"chunk_id": "b"}}),
    ]
    (sources / "partly-broken.jsonl").write_text("\n".join(partly) + "\n")
    repeated = [
        json.dumps({"content": "Backups run every six hours.", "metadata": {"chunk_id": "same"}}),
        json.dumps({"content": "Restores are tested every month.", "metadata": {"chunk_id": "same"}}),
        json.dumps({"content": "Backups run every six hours.", "metadata": {"chunk_id": "other"}}),
    ]
    (sources / "duplicate-ids.jsonl").write_text("\n".join(repeated) + "\n")
    return {"partly-broken.jsonl": [json.loads(partly[0])["content"], json.loads(partly[2])["content"]]}


def test_bad_files_fail_alone_with_their_names_and_every_good_document_completes(simulator, data_dir):
    sim = simulator(**FAST)
    expected_texts = write_sources(data_dir / "sources")
    env = cli_env(data_dir, sim.base_url)

    run = run_cli(*RUN, env=env, check=False)
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"{len(GOOD) + 2} documents done, {len(BAD)} failed" in run.stdout
    failed_lines = [line.strip() for line in run.stderr.splitlines() if line.strip().startswith("FAILED ")]
    assert len(failed_lines) == len(BAD), failed_lines
    for name, problem in BAD.items():
        (line,) = [line for line in failed_lines if line.startswith(f"FAILED {name}:")]
        assert line.startswith(f"FAILED {name}: {data_dir / 'sources' / name}: {problem}"), line
    # A JSONL file with some bad lines keeps its good ones; the bad line is named with its number.
    output = run.stdout + run.stderr
    assert "partly-broken.jsonl: line 2: not valid JSON" in output

    documents = sql("SELECT document, count(DISTINCT chunk_id) AS chunks FROM qa_pairs GROUP BY 1 ORDER BY 1", env)
    assert {row["document"]: row["chunks"] for row in documents} == {
        **{name: 1 for name in GOOD},
        "partly-broken.jsonl": 2,
        "duplicate-ids.jsonl": 3,
    }
    sent = sim.stats()["requests_by_passage"]
    assert all(sent[passage_key(text)] == 1 for text in expected_texts["partly-broken.jsonl"])
    # Records sharing a source id stay apart (chunk ids are positional), and the same text twice costs one request.
    rows = sql("SELECT DISTINCT chunk_id, source_chunk_id FROM chunks WHERE document = 'duplicate-ids.jsonl'", env)
    assert sorted(row["source_chunk_id"] for row in rows) == ["other", "same", "same"]
    assert len({row["chunk_id"] for row in rows}) == 3
    assert sent[passage_key("Backups run every six hours.")] == 1


def test_a_50_mb_document_is_chunked_without_trouble_and_generation_for_it_is_skipped_here(data_dir):
    paragraph = (
        "The replication service copies every changed block to the standby region within five seconds. "
        "When the link is down it queues changes on local disk and replays them in order once it returns.\n\n"
    )
    section = "## Topic {}\n\n" + paragraph * 12
    with (data_dir / "sources" / "huge manual.md").open("w", encoding="utf-8") as handle:
        written, index = 0, 0
        while written < 50 * 2**20:
            text = section.format(index)
            handle.write(text)
            written += len(text)
            index += 1
    assert os.path.getsize(data_dir / "sources" / "huge manual.md") >= 50 * 2**20

    started = time.monotonic()
    run = run_cli("run", "--chunks-only", env=cli_env(data_dir), timeout=300)
    elapsed = time.monotonic() - started
    assert "1 documents done, 0 failed" in run.stdout
    stats = sql("SELECT count(*) AS chunks, max(n_tokens) AS largest FROM chunks", cli_env(data_dir))[0]
    assert stats["chunks"] > 20_000 and stats["largest"] <= 800
    assert elapsed < 240
