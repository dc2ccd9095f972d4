"""SIGTERM or Ctrl-C stops a run gracefully: no new chunk starts, requests in flight finish and are saved."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from qa_pipeline.core.layout import DataLayout
from qa_pipeline.simulator.server import passage_key
from qa_pipeline_tests.conftest import REPO, cli_env, run_cli, sql

RUN = ("run", "--skip-benchmark", "--concurrency", "16", "--max-tokens", "512")


def write_records(path: Path, count: int) -> list[str]:
    texts = [f"Record {i}: the sync job copies {i * 3} files and checks {i % 9} checksums." for i in range(count)]
    path.write_text("".join(json.dumps({"content": text}) + "\n" for text in texts), encoding="utf-8")
    return texts


def journal_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []


def start_run(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qa_pipeline.cli", *RUN],
        env=env,
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_for_lines(journal: Path, count: int, process: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while len(journal_lines(journal)) < count:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_sigterm_lets_requests_in_flight_finish_and_saves_them_so_the_rerun_sends_nothing_twice(
    simulator, data_dir, tmp_path
):
    # About a quarter of a second per request: at any moment 16 requests are in flight.
    sim = simulator(max_num_seqs=64, step_base_ms=5, step_per_seq_ms=0, output_tokens_mean=50, output_tokens_sigma=0)
    texts = write_records(data_dir / "sources" / "records.jsonl", 300)
    later = "The later document must not start once the run was asked to stop."
    (data_dir / "sources" / "z-later.md").write_text(f"# Later\n\n{later}\n")
    env = cli_env(data_dir, sim.base_url)
    journal = DataLayout(data_dir).journal_file("records.jsonl")
    log = tmp_path / "run.log"

    process = start_run(env, log)
    try:
        wait_for_lines(journal, 40, process, log)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        returncode = process.wait(timeout=60)
    finally:
        process.kill()
    stopped_in = time.monotonic() - signalled
    output = log.read_text()

    assert returncode == 130, output[-3000:]
    assert stopped_in < 30, "requests in flight take a quarter of a second; the stop is bounded"
    assert "SIGTERM received: stopping" in output
    assert "run the same command again to resume" in output
    lines = journal_lines(journal)
    assert all(line.endswith("\n") and json.loads(line) for line in lines), "every journal line is whole"
    stats = sim.stats()
    assert stats["aborted"] == 0, "no request was cut off"
    assert stats["requests_total"] == len(lines) < 300, "every request sent was finished and saved, then none more"
    assert passage_key(later) not in stats["requests_by_passage"], "no further document was started"

    run_cli(*RUN, env=env)
    sent = sim.stats()["requests_by_passage"]
    assert [sent.get(passage_key(text)) for text in [*texts, later]] == [1] * 301, "no chunk was sent twice"
    assert sql("SELECT count(DISTINCT chunk_id) AS chunks FROM qa_pairs", env) == [{"chunks": 301}]


def test_a_second_ctrl_c_abandons_slow_requests_at_once_and_the_journal_stays_whole(simulator, data_dir, tmp_path):
    # Each request takes about 20 s: nobody wants to wait for them after a second Ctrl-C.
    sim = simulator(max_num_seqs=64, step_base_ms=100, step_per_seq_ms=0, output_tokens_mean=200, output_tokens_sigma=0)
    write_records(data_dir / "sources" / "records.jsonl", 50)
    env = cli_env(data_dir, sim.base_url)
    log = tmp_path / "run.log"

    process = start_run(env, log)
    try:
        deadline = time.monotonic() + 90
        while sim.stats()["running"] < 16:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert process.poll() is None, "the first Ctrl-C waits for the requests in flight"
        process.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        returncode = process.wait(timeout=30)
    finally:
        process.kill()
    output = log.read_text()

    assert returncode == 130, output[-3000:]
    assert time.monotonic() - signalled < 10
    assert "SIGINT received again: abandoning requests in flight" in output
    journal = DataLayout(data_dir).journal_file("records.jsonl")
    assert all(json.loads(line) for line in journal_lines(journal))
    assert sim.stats()["aborted"] >= 16
