"""`qa-pipeline run --failed` re-runs only the documents that failed, and inside them only the failed chunks."""

from __future__ import annotations

from qa_pipeline.simulator.server import passage_key
from qa_pipeline_tests.conftest import cli_env, run_cli, sql

FAST = {"step_base_ms": 1, "step_per_seq_ms": 0.05, "output_tokens_mean": 30, "output_tokens_max": 200}
RUN = ("run", "--skip-benchmark", "--concurrency", "4", "--max-tokens", "512")
MARKER = "QUARANTINED"


def test_run_failed_reruns_only_the_failed_documents_and_only_their_failed_chunks(simulator, data_dir):
    sim = simulator(**FAST, fail_if_contains=[MARKER])
    texts = {}
    for index in range(4):
        parts = [
            f"Document {index}, part {part}: the archive keeps {part + index} copies."
            + (f" It is {MARKER} for now." if index == 2 and part == 1 else "")
            for part in range(3)
        ]
        body = "\n\n".join(f"## Part {part}\n\n{text}" for part, text in enumerate(parts))
        (data_dir / "sources" / f"doc-{index}.md").write_text(f"# Document {index}\n\n{body}\n")
        texts[index] = parts
    env = cli_env(data_dir, sim.base_url)

    first = run_cli(*RUN, env=env, check=False)
    assert first.returncode == 1
    assert "3 documents done, 1 failed" in first.stdout
    assert "FAILED doc-2.md: 1 of 3 chunks of 'doc-2.md' failed" in first.stderr

    sim.set_faults()
    sim.reset_stats()
    again = run_cli(*RUN, "--failed", env=env)
    assert "qa-pipeline run: 1 documents from" in again.stdout
    assert "1 documents done, 0 failed" in again.stdout
    assert sim.stats()["requests_by_passage"] == {passage_key(texts[2][1]): 1}
    assert sql("SELECT count(DISTINCT chunk_id) AS chunks FROM qa_pairs", env) == [{"chunks": 12}]

    nothing = run_cli(*RUN, "--failed", env=env)
    assert "no document or chunk failed in its last run; nothing to re-run" in nothing.stdout


def test_run_failed_also_retries_the_failed_chunks_of_documents_under_their_threshold(simulator, data_dir):
    sim = simulator(**FAST, fail_if_contains=[MARKER])
    parts = [f"Part {part}: the cache keeps {part} entries." + (f" It is {MARKER}." if part == 1 else "") for part in range(3)]
    body = "\n\n".join(f"## Part {part}\n\n{text}" for part, text in enumerate(parts))
    (data_dir / "sources" / "tolerant.md").write_text(f"# Tolerant\n\n{body}\n")
    env = cli_env(data_dir, sim.base_url)

    first = run_cli(*RUN, "--failure-threshold", "0.5", env=env)
    assert "1 documents done, 0 failed" in first.stdout
    assert sql("SELECT count(*) AS n FROM failures", env) == [{"n": 1}]

    sim.set_faults()
    sim.reset_stats()
    again = run_cli(*RUN, "--failed", env=env)
    assert "qa-pipeline run: 1 documents from" in again.stdout
    assert sim.stats()["requests_by_passage"] == {passage_key(parts[1]): 1}
    assert sql("SELECT count(*) AS n FROM failures", env) == [{"n": 0}]
