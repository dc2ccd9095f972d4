"""A stop during any step ends `qa-pipeline run` with the interrupted status and says finished work is saved."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qa_pipeline_tests.conftest import REPO, cli_env


def big_manual(path: Path, megabytes: int) -> None:
    """A Markdown manual large enough that chunking it takes a few seconds."""
    section = "## Topic {}\n\n" + (
        "The replication service copies every changed block to the standby region within five seconds.\n\n" * 12
    )
    with path.open("w", encoding="utf-8") as handle:
        written, index = 0, 0
        while written < megabytes * 2**20:
            text = section.format(index)
            handle.write(text)
            written += len(text)
            index += 1


def run_until(env: dict[str, str], log: Path, marker: str, *args: str, timeout_s: float = 120) -> subprocess.Popen:
    """Starts `qa-pipeline run ARGS` and returns once its output shows `marker`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "qa_pipeline.cli", "run", *args],
        env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout_s
    while marker not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen, log: Path, signum: int = signal.SIGTERM) -> tuple[int, str]:
    """Sends the signal; the command's exit status and output."""
    process.send_signal(signum)
    try:
        returncode = process.wait(timeout=60)
    finally:
        process.kill()
    return returncode, log.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_chunking_ends_the_command_with_status_130(data_dir, tmp_path, signum):
    big_manual(data_dir / "sources" / "manual.md", 12)
    log = tmp_path / "run.log"
    process = run_until(cli_env(data_dir), log, "chunks: starting a run", "--chunks-only")
    returncode, output = stop(process, log, signum)
    assert returncode == 130, output[-3000:]
    assert "stopped by a signal" in output and "run the same command again to resume" in output
    assert "qa-pipeline run: 1 documents done" not in output, "a stopped command does not report success"


def test_sigterm_during_the_report_step_ends_the_command_with_status_130(simulator, data_dir, tmp_path):
    sim = simulator(zero_latency=True, output_tokens_max=200)
    for index in range(3):
        (data_dir / "sources" / f"doc-{index}.md").write_text(f"# Doc {index}\n\nThe job runs {index} times a day.\n")
    big_manual(data_dir / "sources" / "manual.md", 3)  # enough pairs that the report takes a moment
    log = tmp_path / "run.log"
    env = cli_env(data_dir, sim.base_url)
    process = run_until(
        env, log, "building the quality report", "--skip-benchmark", "--concurrency", "64",
        timeout_s=300,
    )
    returncode, output = stop(process, log)
    assert returncode == 130, output[-3000:]
    assert "stopped by a signal" in output
    assert "qa-pipeline run: 4 documents done" not in output


def test_sigterm_during_the_concurrency_benchmark_ends_the_command_at_once(simulator, data_dir, tmp_path):
    # Every answer takes about 30 s: a benchmark level would outlast the test by far if it were waited for.
    sim = simulator(step_base_ms=100, output_tokens_mean=300, output_tokens_max=400)
    (data_dir / "sources" / "doc.md").write_text("# Doc\n\nThe job runs twice a day and keeps seven copies.\n")
    log = tmp_path / "run.log"
    process = run_until(cli_env(data_dir, sim.base_url), log, "concurrency benchmark: level 1", "--levels", "1,4", timeout_s=300)
    started = time.monotonic()
    returncode, output = stop(process, log)
    assert returncode == 130, output[-3000:]
    assert time.monotonic() - started < 30, "the command waited for the benchmark's requests"
    assert "stopped by a signal" in output
    assert "benchmark_runs" not in output and "recommended" not in output.split("concurrency benchmark: level 1")[-1]
