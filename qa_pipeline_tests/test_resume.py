"""No lost work: a killed run resumes from its journal, and an unchanged partition costs no request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from qa_pipeline.core.generation import GenerationSettings, request_hash
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.prompts import QAPair, build_messages, response_format
from qa_pipeline.simulator.server import passage_key
from qa_pipeline.core.storage import ChunkResult, Journal
from qa_pipeline_tests.conftest import REPO, cli_env, run_cli, sql

CONCURRENCY = 16
# Short answers at about 1 ms per decode step: a few hundred chunks per second at concurrency 16.
FAST_SIMULATOR = {"step_base_ms": 1, "step_per_seq_ms": 0.05, "output_tokens_mean": 30, "output_tokens_max": 200}
RUN = ("run", "--skip-benchmark", "--concurrency", str(CONCURRENCY), "--max-tokens", "512")


def record_text(index: int) -> str:
    services = ("billing", "search", "storage", "auth", "mail")
    return (
        f"Record {index}: the {services[index % 5]} service keeps {index * 7 % 101} replicas in region "
        f"{index % 13}. It retries a failed upload {index % 4 + 1} times before it pages the on-call engineer."
    )


def write_prechunked(path: Path, count: int) -> list[str]:
    """A pre-chunked JSONL source of `count` distinct short records; returns their texts."""
    texts = [record_text(i) for i in range(count)]
    with path.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"content": text, "metadata": {"chunk_id": f"r{i}"}}) + "\n")
    return texts


def journal_lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


def test_a_run_killed_at_half_way_resends_at_most_the_requests_in_flight_and_keeps_one_result_per_chunk(
    simulator, data_dir, tmp_path
):
    sim = simulator(max_num_seqs=32, **FAST_SIMULATOR)
    texts = write_prechunked(data_dir / "sources" / "records.jsonl", 1000)
    env = cli_env(data_dir, sim.base_url)
    journal = DataLayout(data_dir).journal_file("records.jsonl")

    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "qa_pipeline.cli", *RUN], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 60
            while journal_lines(journal) < 500 and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    done_before_kill = journal_lines(journal)
    assert 300 <= done_before_kill < 1000, (tmp_path / "killed.log").read_text()[-3000:]

    rerun = run_cli(*RUN, env=env)
    assert "1 documents done, 0 failed" in rerun.stdout
    assert f"{done_before_kill} from cache" in rerun.stdout + rerun.stderr

    sent = sim.stats()["requests_by_passage"]
    per_chunk = [sent.get(passage_key(text), 0) for text in texts]
    assert min(per_chunk) == 1, "every chunk was sent"
    sent_twice = sum(count - 1 for count in per_chunk)
    assert sent_twice <= CONCURRENCY, f"{sent_twice} chunks were sent again after the kill"

    results = sql(
        "SELECT count(*) AS pairs, count(DISTINCT chunk_id) AS chunks, "
        "(SELECT count(*) FROM failures) AS failures FROM qa_pairs",
        env,
    )[0]
    assert results == {"pairs": 3000, "chunks": 1000, "failures": 0}
    uneven = sql("SELECT chunk_id, count(*) AS n FROM qa_pairs GROUP BY 1 HAVING n <> 3", env)
    assert uneven == [], "each chunk has exactly its one answer (three pairs), none twice"
    assert journal_lines(journal) == 1000, "the journal is compacted to one line per chunk"


def test_an_unchanged_partition_costs_no_request_and_a_changed_prompt_or_force_regenerates(simulator, data_dir):
    sim = simulator(**FAST_SIMULATOR)
    write_prechunked(data_dir / "sources" / "records.jsonl", 40)
    env = cli_env(data_dir, sim.base_url)

    run_cli(*RUN, env=env)
    assert sim.stats()["requests_total"] == 40

    sim.reset_stats()
    again = run_cli(*RUN, env=env)
    assert sim.stats()["requests_total"] == 0
    assert "40 already done (journal/cache), 0 to send" in again.stdout + again.stderr

    sim.reset_stats()
    run_cli(*RUN, "--question-types", "factual,conceptual", env=env)
    assert sim.stats()["requests_total"] == 40, "a different prompt misses the cache"

    sim.reset_stats()
    run_cli(*RUN, "--question-types", "factual,conceptual", "--force", env=env)
    assert sim.stats()["requests_total"] == 40, "--force regenerates although everything is cached"

    rows = sql("SELECT count(DISTINCT chunk_id) AS chunks, count(*) AS pairs FROM qa_pairs", env)[0]
    assert rows == {"chunks": 40, "pairs": 80}, "two question types asked for: two pairs per chunk"
    journal = DataLayout(data_dir).journal_file("records.jsonl")
    assert journal_lines(journal) == 40, "after three prompts, the journal keeps only the current answers"


def test_the_cache_key_changes_with_model_prompt_sampling_parameters_and_schema():
    messages = build_messages("The billing service retries twice.")
    settings = GenerationSettings()
    schema = response_format()
    key = request_hash("model-a", messages, settings, schema)

    assert request_hash("model-a", build_messages("The billing service retries twice."), settings, schema) == key
    changed = [
        request_hash("model-b", messages, settings, schema),
        request_hash("model-a", build_messages("The billing service retries three times."), settings, schema),
        request_hash("model-a", build_messages("The billing service retries twice.", question_types=("factual",)),
                     settings, schema),
        request_hash("model-a", messages, settings.model_copy(update={"max_tokens": 300}), schema),
        request_hash("model-a", messages, settings.model_copy(update={"temperature": 0.5}), schema),
        request_hash("model-a", messages, settings.model_copy(update={"seed": 1}), schema),
        request_hash("model-a", messages, settings, response_format(name="other")),
    ]
    assert len({key, *changed}) == len(changed) + 1


def _result(key: str) -> ChunkResult:
    return ChunkResult(
        document="doc.md",
        chunk_id=key,
        request_hash=key,
        ok=True,
        pairs=[QAPair(question="What is it?", answer="A test.", type="factual")],
        finished_at=datetime.now(UTC),
    )


def test_a_line_cut_by_a_kill_is_dropped_before_the_next_append_so_it_cannot_swallow_a_result(tmp_path):
    path = tmp_path / "doc.jsonl"
    with Journal(path) as journal:
        journal.append(_result("a"))
    with path.open("a") as handle:
        handle.write(_result("b").model_dump_json()[:50])  # SIGKILL in the middle of a write

    with Journal(path) as journal:
        journal.append(_result("c"))

    assert set(Journal(path).load()) == {"a", "c"}
    assert all(json.loads(line) for line in path.read_text().splitlines())
