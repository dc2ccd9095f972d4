"""`qa-pipeline embedded status|stop|start`: one owner for the embedded vLLM server, run as a user runs it.

Most tests stand a simulator in for vLLM (it answers `/health` and `/v1/models` the same way); the
one marked `embedded` starts the real server once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest

from qa_pipeline.core.embedded import MODEL_NAME, STATE_FILE_NAME, stop_embedded_server
from qa_pipeline_tests.conftest import cli_env, run_cli
from qa_pipeline_tests.test_embedded import (  # noqa: F401
    data_dir_with_model,
    embedded_installed,
    model_dir,
    port_accepts_connections,
)


def record_server(data_dir: Path, pid: int, port: int, **fields: str) -> Path:
    """Write the state file as a starter would have; `fields` add to or replace its entries."""
    state = {
        "pid": pid,
        "port": port,
        "model": MODEL_NAME,
        "base_url": f"http://127.0.0.1:{port}/v1",
        "model_dir": str(data_dir / "models" / "smollm2-135m-instruct"),
        "log_file": str(data_dir / "logs" / "embedded-vllm.log"),
        **fields,
    }
    state_file = data_dir / STATE_FILE_NAME
    state_file.write_text(json.dumps(state))
    return state_file


def process_running(pid: int) -> bool:
    """True while the process or any process of its group (vLLM's engine core) runs; zombies count as gone."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            state, _parent, group = stat[stat.rfind(")") + 2 :].split()[:3]
            if (int(entry.name) == pid or int(group) == pid) and state not in ("Z", "X"):
                return True
    return False


def kill_processes_of(data_dir: Path) -> None:
    """SIGKILL every process whose environment names this data directory (a CLI and the vLLM it started)."""
    marker = f"QA_PIPELINE_DATA_DIR={data_dir}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)


def health_status(port: int) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        return response.status


def test_status_on_a_fresh_data_dir_says_none_is_running_and_exits_1(data_dir):
    status = run_cli("embedded", "status", env=cli_env(data_dir), check=False)

    assert status.returncode == 1
    assert status.stdout.startswith(f"no embedded server running for data dir {data_dir}")


def test_stop_with_nothing_running_says_so_and_exits_0(data_dir):
    stop = run_cli("embedded", "stop", env=cli_env(data_dir))

    assert "no embedded server running" in stop.stdout
    assert "nothing to stop" in stop.stdout


def test_the_data_dir_option_wins_over_the_environment(data_dir, simulator, tmp_path):
    server = simulator(served_model_name=[MODEL_NAME])
    record_server(data_dir, server.pid, server.port)
    elsewhere = tmp_path / "elsewhere"

    status = run_cli("embedded", "status", "--data-dir", str(data_dir), env=cli_env(elsewhere))

    assert f"pid       {server.pid}" in status.stdout
    assert not elsewhere.exists(), "status creates nothing"


def test_status_reads_a_state_file_written_before_the_start_time_was_recorded(data_dir, simulator):
    server = simulator(served_model_name=[MODEL_NAME])
    record_server(data_dir, server.pid, server.port)

    status = run_cli("embedded", "status", env=cli_env(data_dir))

    lines = status.stdout.splitlines()
    assert lines[0] == "embedded vLLM server running"
    assert f"  pid       {server.pid}" in lines
    assert f"  port      {server.port}" in lines
    assert f"  base URL  {server.openai_base_url}" in lines
    assert any(line.startswith(f"  model     {MODEL_NAME} ") for line in lines)
    assert any(line.startswith("  uptime    unknown") for line in lines)
    assert f"  log       {data_dir / 'logs' / 'embedded-vllm.log'}" in lines


def test_a_different_server_on_the_recorded_port_is_not_the_embedded_one(data_dir, simulator):
    other = simulator(served_model_name=["someone-elses-model"])
    record_server(data_dir, other.pid, other.port, started_at="2025-01-01T00:00:00Z")
    assert health_status(other.port) == 200

    status = run_cli("embedded", "status", env=cli_env(data_dir), check=False)

    assert status.returncode == 1
    assert "no embedded server running" in status.stdout
    assert f"records pid {other.pid} on port {other.port}" in status.stdout
    assert "qa-pipeline embedded stop" in status.stdout


def test_stop_clears_the_record_of_a_server_that_is_gone_and_never_kills_an_unrelated_process(data_dir, simulator):
    unrelated = simulator(served_model_name=[MODEL_NAME])
    state_file = record_server(data_dir, unrelated.pid, unrelated.port)

    stop = run_cli("embedded", "stop", env=cli_env(data_dir))

    assert "nothing to stop" in stop.stdout
    assert not state_file.exists()
    assert process_running(unrelated.pid), "only a vLLM server on the recorded port is ever stopped"


def test_status_says_when_another_process_is_starting_the_server(data_dir):
    with open(data_dir / f".{STATE_FILE_NAME}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status = run_cli("embedded", "status", env=cli_env(data_dir), check=False)

    assert status.returncode == 1
    assert "no embedded server running" in status.stdout
    assert "starting one right now" in status.stdout


@pytest.mark.embedded
def test_start_leaves_it_running_status_describes_it_and_stop_ends_it(model_dir, tmp_path, request):  # noqa: F811
    layout = data_dir_with_model(tmp_path / "data", model_dir)
    env = cli_env(layout.root)

    def stop_whatever_is_left() -> None:
        stop_embedded_server(layout, progress=lambda _: None)
        kill_processes_of(layout.root)

    request.addfinalizer(stop_whatever_is_left)

    start = run_cli("embedded", "start", env=env, timeout=900)
    assert "embedded vLLM server running at http://127.0.0.1:" in start.stdout

    status = run_cli("embedded", "status", env=env)
    described = [line.strip().split("  ", 1) for line in status.stdout.splitlines()[1:]]
    fields = {name: value.strip() for name, value in described}
    pid, port = int(fields["pid"]), int(fields["port"])
    assert fields["base URL"] == f"http://127.0.0.1:{port}/v1"
    assert fields["model"].startswith(f"{MODEL_NAME} ")
    assert fields["uptime"].endswith(" UTC)") and not fields["uptime"].startswith("unknown")
    assert fields["log"] == str(layout.logs_dir / "embedded-vllm.log")
    assert health_status(port) == 200
    assert process_running(pid)

    again = run_cli("embedded", "start", env=env)
    assert f"Reusing the embedded vLLM server at http://127.0.0.1:{port}/v1 (pid {pid})" in again.stdout

    stop = run_cli("embedded", "stop", env=env)
    stopped = f"Stopped the embedded vLLM server ({MODEL_NAME}) at http://127.0.0.1:{port}/v1 (pid {pid})."
    assert stopped in stop.stdout
    assert not process_running(pid)
    assert not port_accepts_connections(port)
    assert run_cli("embedded", "status", env=env, check=False).returncode == 1
