"""`dg` finds the project through `[tool.dg]` in pyproject.toml: checks, lists and launches its assets.

Each command runs as a user types it, `.venv/bin/dg ...` from the repository root, in its own process.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from qa_pipeline_tests.conftest import REPO, cli_env, copy_sample, run_cli, sql

DG = Path(sys.executable).parent / "dg"


def run_dg(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [str(DG), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert completed.returncode == 0, (
        f"dg {' '.join(args)} exited {completed.returncode}\n"
        f"--- stdout ---\n{completed.stdout[-4000:]}\n--- stderr ---\n{completed.stderr[-6000:]}"
    )
    return completed


def test_dg_is_pinned_and_installed_at_the_release_of_dagster():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==", 1) for d in dependencies if "==" in d)
    assert pins["dagster-dg-cli"] == pins["dagster"]
    for package in ("dagster-dg-cli", "dagster-dg-core", "dagster-shared"):
        assert importlib.metadata.version(package) == pins["dagster"], package


def test_dg_check_defs_loads_every_definition_of_the_project(data_dir):
    checked = run_dg("check", "defs", env=cli_env(data_dir))
    assert "All definitions loaded successfully." in checked.stdout + checked.stderr


def test_dg_list_defs_shows_the_pipeline_assets_sensors_and_schedule(data_dir):
    listed = json.loads(run_dg("list", "defs", "--json", env=cli_env(data_dir)).stdout)
    assets = {asset["asset_key"]: asset for asset in listed["assets"]}
    assert {"chunks", "qa_pairs", "quality_report"} <= set(assets)
    assert "chunks" in assets["qa_pairs"]["dependency_keys"]
    assert {"source_documents_sensor", "quality_report_sensor"} <= {s["name"] for s in listed["sensors"]}


def test_dg_launch_materializes_one_document_partition_once_the_instance_knows_it(data_dir):
    copy_sample(data_dir, "pep-0020.rst", "pep-0257.rst")
    env = cli_env(data_dir)
    # Partitions are added by the sources sensor or by `qa-pipeline run`; this one chunks only pep-0020.
    run_cli("run", "--chunks-only", "--documents", "pep-0020.rst", env=env)
    assert [row["document"] for row in sql("SELECT DISTINCT document FROM chunks", env)] == ["pep-0020.rst"]

    launched = run_dg("launch", "--assets", "chunks", "--partition", "pep-0257.rst", env=env)

    assert "RUN_SUCCESS" in launched.stdout + launched.stderr
    documents = {row["document"] for row in sql("SELECT DISTINCT document FROM chunks", env)}
    assert documents == {"pep-0020.rst", "pep-0257.rst"}
