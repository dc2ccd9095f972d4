"""`qa-pipeline embedded status|stop|start`: look after the embedded vLLM server of a data directory."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from qa_pipeline.core.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    ServerState,
    recorded_server,
    recorded_state,
    server_starting,
    stop_embedded_server,
)
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.progress import format_duration

NONE_RUNNING = "no embedded server running"


def command_status(args: argparse.Namespace) -> int:
    layout = DataLayout.from_env(args.data_dir)
    running = recorded_server(layout)
    if running is not None:
        print(_describe(running))
        return 0
    print(f"{NONE_RUNNING} for data dir {layout.root}.")
    stale = recorded_state(layout)
    if server_starting(layout):
        print("Another process is starting one right now (a `qa-pipeline run` or a Dagster run); ask again shortly.")
    elif stale is not None:
        print(
            f"Its state file records pid {stale.pid} on port {stale.port}, which does not answer {_health_url(stale)}; "
            f"`qa-pipeline embedded stop` clears it. Log: {stale.log_file}"
        )
    return 1


def command_stop(args: argparse.Namespace) -> int:
    layout = DataLayout.from_env(args.data_dir)
    if not stop_embedded_server(layout, progress=lambda line: print(line, flush=True)):
        print(f"{NONE_RUNNING} for data dir {layout.root}: nothing to stop.")
    return 0


def command_start(args: argparse.Namespace) -> int:
    layout = DataLayout.from_env(args.data_dir)
    try:
        # Not stopped on the way out: it keeps serving `dagster dev` and later runs until `embedded stop`.
        server = EmbeddedServer.for_data_dir(layout, progress=lambda line: print(line, flush=True)).start()
    except EmbeddedServerError as error:
        print(f"qa-pipeline embedded start: {error}", file=sys.stderr)
        return 1
    print(f"embedded vLLM server running at {server.base_url} (pid {server.pid}).")
    print("It stays running for later runs and dagster dev; stop it with: qa-pipeline embedded stop")
    return 0


def _describe(state: ServerState) -> str:
    if state.started_at is None:
        uptime = "unknown (started by an older qa_pipeline that did not record the time)"
    else:
        since = datetime.now(timezone.utc) - state.started_at
        uptime = f"{format_duration(since.total_seconds())} (since {state.started_at:%Y-%m-%d %H:%M:%S} UTC)"
    return "\n".join(
        [
            "embedded vLLM server running",
            f"  pid       {state.pid}",
            f"  port      {state.port}",
            f"  base URL  {state.base_url}",
            f"  model     {state.model} ({state.model_dir})",
            f"  uptime    {uptime}",
            f"  log       {state.log_file}",
        ]
    )


def _health_url(state: ServerState) -> str:
    return state.base_url.removesuffix("/v1") + "/health"


def add_embedded_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `embedded` with its subcommands to the `qa-pipeline` parser."""
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", help="data root (default: $QA_PIPELINE_DATA_DIR or ./data)")

    embedded = subparsers.add_parser(
        "embedded", help="status, stop or start the embedded vLLM server (used when no LLM endpoint is set)"
    )
    commands = embedded.add_subparsers(dest="embedded_command", required=True)
    status = commands.add_parser(
        "status", parents=[data_dir], help="pid, port, URL, model, uptime and log; exit code 1 if none runs"
    )
    status.set_defaults(func=command_status)
    stop = commands.add_parser("stop", parents=[data_dir], help="stop it, whoever started it (a run or `start`)")
    stop.set_defaults(func=command_stop)
    start = commands.add_parser(
        "start", parents=[data_dir], help="start it (or find it running) and leave it running, e.g. for dagster dev"
    )
    start.set_defaults(func=command_start)
