"""Shared fixtures: real simulator processes on loopback, temporary data folders, the project CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SOURCES = REPO / "data" / "sources"


@pytest.fixture
def simulator():
    """Starts simulator processes (options as keyword arguments); all are stopped after the test."""
    from qa_pipeline.simulator.process import start_simulator_process

    started = []

    def start(**options):
        process = start_simulator_process(**options).__enter__()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A data root with an empty sources folder and its own Dagster instance."""
    root = tmp_path / "data"
    (root / "sources").mkdir(parents=True)
    (tmp_path / "dagster_home").mkdir()
    return root


def copy_sample(data_dir: Path, *names: str) -> None:
    for name in names:
        shutil.copy(SAMPLE_SOURCES / name, data_dir / "sources" / name)


def cli_env(data_dir: Path, base_url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QA_PIPELINE_")}
    env.update(
        QA_PIPELINE_DATA_DIR=str(data_dir),
        DAGSTER_HOME=str(data_dir.parent / "dagster_home"),
        PYTHONUNBUFFERED="1",
    )
    if base_url:
        env["QA_PIPELINE_LLM_BASE_URL"] = base_url
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `qa-pipeline ARGS` as a user would, in its own process."""
    completed = subprocess.run(
        [sys.executable, "-m", "qa_pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if check and completed.returncode != 0:
        raise AssertionError(
            f"qa-pipeline {' '.join(args)} exited {completed.returncode}\n"
            f"--- stdout ---\n{completed.stdout[-4000:]}\n--- stderr ---\n{completed.stderr[-6000:]}"
        )
    return completed


def sql(query: str, env: dict[str, str]) -> list[dict]:
    """Rows of a `qa-pipeline sql` query, read from its JSON output."""
    import json

    out = run_cli("sql", query, "--format", "json", env=env).stdout
    return json.loads(out)
