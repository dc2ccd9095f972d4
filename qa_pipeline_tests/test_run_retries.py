"""The deployed instance retries runs whose worker died, never runs that failed in their own code.

A real instance with the `run_retries` settings of deploy/dagster.yaml (SQLite instead of PostgreSQL),
a real daemon (`dagster-daemon run`) that dequeues, launches and auto-retries runs, and runs
launched with `dagster job launch` as a user or the UI would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from qa_pipeline_tests.conftest import REPO

BIN = Path(sys.executable).parent
NOT_RETRIED = "Not retrying run since it failed due to an asset or op failure"
# A per-run tag with the name of the instance setting overrides it: the contrast run below.
RETRY_ON_FAILURE_TAG = "dagster/retry_on_asset_or_op_failure"

FAILING_DEFS = textwrap.dedent(
    '''
    import dagster as dg


    @dg.asset
    def document_over_threshold():
        raise dg.Failure("3 of 4 chunks failed: over the failure threshold 0.5")


    @dg.asset
    def checked_document():
        return 1


    @dg.asset_check(asset=checked_document, blocking=True)
    def enough_pairs():
        return dg.AssetCheckResult(passed=False, description="too few QA pairs")


    defs = dg.Definitions(
        assets=[document_over_threshold, checked_document],
        asset_checks=[enough_pairs],
        jobs=[
            dg.define_asset_job("over_threshold", [document_over_threshold]),
            dg.define_asset_job("failed_blocking_check", [checked_document]),
        ],
        executor=dg.in_process_executor,
    )
    '''
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def deployed_instance(tmp_path) -> Iterator[tuple[Path, Path]]:
    """DAGSTER_HOME with deploy/dagster.yaml minus its PostgreSQL storage, and a code server of failing jobs.

    As in the deployment, the code location is a gRPC server that the CLI and the daemon connect to.
    """
    config = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    del config["storage"]  # SQLite under DAGSTER_HOME; everything else as deployed
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "failing_defs.py").write_text(FAILING_DEFS)
    port = free_port()
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {"host": "127.0.0.1", "port": port}}]}))
    server = subprocess.Popen(
        [str(BIN / "dagster"), "api", "grpc", "-h", "127.0.0.1", "-p", str(port), "-f", "failing_defs.py",
         "--location-name", "failing"],
        env={**os.environ, "DAGSTER_HOME": str(home)}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "the code server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the code server did not start listening"
                time.sleep(0.2)
        yield home, workspace
    finally:
        stop(server)


def launch(job: str, run_id: str, workspace: Path, env: dict[str, str], tags: dict[str, str]) -> subprocess.Popen:
    """`dagster job launch`: the run is queued; the daemon starts it (QueuedRunCoordinator)."""
    return subprocess.Popen(
        [str(BIN / "dagster"), "job", "launch", "-w", str(workspace), "-j", job, "--run-id", run_id,
         "--tags", json.dumps(tags)],
        env=env, cwd=workspace.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def engine_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.message for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)]


def test_daemon_does_not_retry_step_failures_but_would_without_the_setting(deployed_instance):
    home, workspace = deployed_instance
    env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS": "1"}
    runs = {  # name: (job, tags)
        "over_threshold": ("over_threshold", {}),
        "failed_check": ("failed_blocking_check", {}),
        # The same failure with Dagster's default for the setting (what the deploy files had).
        "with_default_setting": ("over_threshold", {RETRY_ON_FAILURE_TAG: "true"}),
    }
    run_ids = {name: str(uuid.uuid4()) for name in runs}
    # Created (storage migrated) before the daemon and the launches, which would otherwise race to.
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
    assert instance.run_retries_retry_on_asset_or_op_failure is False

    def settled() -> bool:
        contrast = instance.get_run_group(run_ids["with_default_setting"])
        retried = contrast is not None and len(contrast[1]) == 2 and all(r.is_finished for r in contrast[1])
        declined = all(
            any(NOT_RETRIED in message for message in engine_messages(instance, run_ids[name]))
            for name in ("over_threshold", "failed_check")
        )
        return retried and declined

    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)],
        env=env, cwd=workspace.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for launched in [launch(job, run_ids[name], workspace, env, tags) for name, (job, tags) in runs.items()]:
            output, _ = launched.communicate(timeout=60)
            assert launched.returncode == 0, output
        deadline = time.monotonic() + 60
        while not settled():
            assert daemon.poll() is None, "dagster-daemon exited"
            assert time.monotonic() < deadline, {
                name: (instance.get_run_by_id(run_id).status, engine_messages(instance, run_id))
                for name, run_id in run_ids.items()
            }
            time.sleep(0.5)
    finally:
        stop(daemon)

    try:
        for name in ("over_threshold", "failed_check"):
            run = instance.get_run_by_id(run_ids[name])
            assert run.status == dg.DagsterRunStatus.FAILURE
            assert run.tags["dagster/failure_reason"] == "STEP_FAILURE"
            assert run.tags["dagster/will_retry"] == "false"
            assert [r.run_id for r in instance.get_run_group(run.run_id)[1]] == [run.run_id], f"{name} was retried"
        # The contrast: the same failure under Dagster's default is retried, once (max_retries: 1).
        original = instance.get_run_by_id(run_ids["with_default_setting"])
        (retry,) = [r for r in instance.get_run_group(original.run_id)[1] if r.run_id != original.run_id]
        assert original.tags["dagster/will_retry"] == "true"
        assert retry.parent_run_id == original.run_id and retry.tags["dagster/retry_number"] == "1"
    finally:
        instance.dispose()
