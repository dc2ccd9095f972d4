"""Benchmark P3: a backfill of many small document partitions through Dagster, on a real instance.

A temporary DAGSTER_HOME with the queued run coordinator, `dagster-daemon run` (backfill daemon and
run queue), and an asset backfill of `qa_pairs` (with its checks) as the UI submits one, with no run
config; under the project's default policy (up to 1,000 documents a run, benchmarks/backfill_definitions.py)
the daemon turns a backfill of 100 documents into one run over all of them.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from dagster._daemon.controller import DEFAULT_DAEMON_INTERVAL_SECONDS

from benchmarks.workloads import REPO, make_tasks
from qa_pipeline.core.chunking import Chunk, chunks_to_frame, content_hash, count_tokens
from qa_pipeline.core.client import parse_prometheus
from qa_pipeline.core.layout import DataLayout, Table
from qa_pipeline.core.storage import Storage



@dataclass
class BackfillResult:
    documents: int
    chunks: int
    runs: int
    succeeded: int
    failed: int
    output_tokens: int
    duration_s: float  # from submitting the backfill to the end of its last run
    first_run_start_s: float  # from submitting to the first run's start
    queue_duration_s: float  # the Generator's work queue inside the run (its `duration_s` metadata)
    check_evaluations: int = 0  # the checks' verdicts recorded by the runs (three per document)
    phases: dict[str, float] = field(default_factory=dict)  # seconds between the run's own events
    running_samples: list[float] = field(default_factory=list)  # the server's running requests, sampled

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s


def _write_inputs(layout: DataLayout, documents: int, chunks_per_document: int) -> list[str]:
    """Chunk partitions written directly (P3 measures `qa_pairs`, not chunking)."""
    storage = Storage(layout)
    keys = []
    for number in range(documents):
        key = f"doc-{number:03d}.md"
        chunk_list = [
            Chunk(
                document=key,
                chunk_id=task.chunk_id,
                position=position,
                heading_path=list(task.heading_path),
                content=task.content,
                n_tokens=count_tokens(task.content),
                content_hash=content_hash(task.content),
            )
            for position, task in enumerate(make_tasks(chunks_per_document, key, offset=number * chunks_per_document))
        ]
        storage.write_partition(Table.CHUNKS, key, chunks_to_frame(chunk_list))
        keys.append(key)
    return keys


# The backfill daemon's pause between passes (30 s; not configurable in dagster.yaml).
BACKFILL_DAEMON_INTERVAL_S = float(DEFAULT_DAEMON_INTERVAL_SECONDS)
# When the backfill is submitted after a pass of the backfill daemon: half its interval, a user's mean wait.
DAEMON_PHASE_S = BACKFILL_DAEMON_INTERVAL_S / 2

# The project's own single-machine instance (queued runs, pools, dequeue interval): P3 measures the defaults.
INSTANCE_YAML = (REPO / "deploy" / "dagster-dev.yaml").read_text()


def _sample_running(base_url: str, stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(0.5):
        try:
            with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as response:
                samples.append(parse_prometheus(response.read().decode()).running or 0.0)
        except OSError:
            pass


def run_backfill(
    base_url: str,
    documents: int,
    chunks_per_document: int,
    output_tokens_total: Callable[[], int],
    log: Callable[[str], None] = print,
    timeout_s: float = 900.0,
    documents_per_run: str | None = None,
) -> BackfillResult:
    """Backfills `qa_pairs` for `documents` partitions as the UI's "Materialize" does (an asset
    backfill that the daemon turns into runs, with no run config: the project's defaults), and measures
    from submission to the last run's end. `documents_per_run` sets QA_PIPELINE_DOCUMENTS_PER_RUN for
    the code location (None: the project's default)."""
    from dagster._core.execution.backfill import PartitionBackfill  # the UI's own backfill record
    from dagster._core.utils import make_new_backfill_id

    from benchmarks.backfill_definitions import defs, qa_pairs

    with tempfile.TemporaryDirectory(prefix="qa-bench-p3-") as scratch:
        root = Path(scratch)
        home, data = root / "dagster_home", root / "data"
        home.mkdir()
        (home / "dagster.yaml").write_text(INSTANCE_YAML)
        workspace = root / "workspace.yaml"
        workspace.write_text(
            "load_from:\n  - python_module:\n      module_name: benchmarks.backfill_definitions\n"
            f"      working_directory: {REPO}\n      location_name: qa_pipeline_p3\n"
        )
        keys = _write_inputs(DataLayout(root=data), documents, chunks_per_document)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("QA_PIPELINE_")},
            "DAGSTER_HOME": str(home),
            "QA_PIPELINE_DATA_DIR": str(data),
            "QA_PIPELINE_LLM_BASE_URL": base_url,
            "PYTHONPATH": str(REPO),
            **({"QA_PIPELINE_DOCUMENTS_PER_RUN": documents_per_run} if documents_per_run else {}),
        }
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions("documents", keys)
            daemon = subprocess.Popen(
                [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(workspace)],
                env=env,
                cwd=root,
                stdout=(root / "daemon.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                first_pass = _wait_for_daemon(instance, daemon, root / "daemon.log")
                # The backfill daemon looks for new backfills every 30 s (a fixed interval): a backfill
                # submitted at a random moment waits 15 s on average, so submit halfway between passes.
                passes = math.ceil((time.time() + 1 - first_pass - DAEMON_PHASE_S) / BACKFILL_DAEMON_INTERVAL_S)
                time.sleep(max(0.0, first_pass + passes * BACKFILL_DAEMON_INTERVAL_S + DAEMON_PHASE_S - time.time()))
                samples: list[float] = []
                stop = threading.Event()
                sampler = threading.Thread(target=_sample_running, args=(base_url, stop, samples), daemon=True)
                tokens_before = output_tokens_total()
                submitted = time.time()
                sampler.start()
                backfill_id = make_new_backfill_id()
                instance.add_backfill(
                    PartitionBackfill.from_asset_partitions(
                        backfill_id=backfill_id,
                        asset_graph=defs.resolve_asset_graph(),
                        partition_names=keys,
                        asset_selection=[qa_pairs.key],
                        backfill_timestamp=submitted,
                        tags={},
                        dynamic_partitions_store=instance,
                        all_partitions=False,
                        title="benchmark P3",
                        description=None,
                        run_config={},
                    )
                )
                log(f"P3: backfill of {len(keys)} documents submitted; waiting for the daemon and the run(s)")
                records = _wait_for_backfill(instance, backfill_id, submitted + timeout_s, root / "daemon.log")
                stop.set()
                sampler.join()
                tokens = output_tokens_total() - tokens_before
            finally:
                os.killpg(daemon.pid, signal.SIGTERM)
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(daemon.pid, signal.SIGKILL)
                    daemon.wait()
            latest = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=qa_pairs.key), limit=1
            ).records
            queue_duration_s = (
                latest[0].asset_materialization.metadata["duration_s"].value if latest else float("nan")
            )
            phases = _run_phases(instance, records[0], submitted, queue_duration_s) if len(records) == 1 else {}
            statuses = instance.get_status_by_partition(qa_pairs.key, keys, qa_pairs.partitions_def)
            check_evaluations = sum(
                len(instance.all_logs(r.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION))
                for r in records
            )
        ended = max(r.end_time for r in records if r.end_time)
        started = min(r.start_time for r in records if r.start_time)
        succeeded = sum(status == dg.AssetPartitionStatus.MATERIALIZED for status in (statuses or {}).values())
        return BackfillResult(
            documents=len(keys),
            chunks=len(keys) * chunks_per_document,
            runs=len(records),
            succeeded=succeeded,
            failed=len(keys) - succeeded,
            output_tokens=tokens,
            duration_s=ended - submitted,
            first_run_start_s=started - submitted,
            queue_duration_s=queue_duration_s,
            check_evaluations=check_evaluations,
            phases=phases,
            running_samples=samples,
        )


def _run_phases(
    instance: dg.DagsterInstance, record, submitted: float, queue_duration_s: float
) -> dict[str, float]:
    """Where the time from submission to the run's end went, between the run's own events."""
    kinds = {
        dg.DagsterEventType.RUN_START: "RUN_START",
        dg.DagsterEventType.STEP_START: "STEP_START",
        dg.DagsterEventType.STEP_SUCCESS: "STEP_SUCCESS",
        dg.DagsterEventType.STEP_FAILURE: "STEP_FAILURE",
        dg.DagsterEventType.RUN_SUCCESS: "RUN_SUCCESS",
        dg.DagsterEventType.RUN_FAILURE: "RUN_FAILURE",
    }
    created = record.create_timestamp.timestamp()
    times: dict[str, float] = {}
    for entry in instance.all_logs(record.dagster_run.run_id, of_type=set(kinds)):
        times.setdefault(kinds[entry.dagster_event.event_type], entry.timestamp)
    step_end = times.get("STEP_SUCCESS") or times.get("STEP_FAILURE")
    run_end = times.get("RUN_SUCCESS") or times.get("RUN_FAILURE")
    if not ("RUN_START" in times and "STEP_START" in times and step_end and run_end):
        return {}
    step = step_end - times["STEP_START"]
    steps: dict[str, list[float]] = {}
    for entry in instance.all_logs(record.dagster_run.run_id, of_type={
        dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE
    }):
        steps.setdefault(entry.step_key, []).append(entry.timestamp)
    return {
        "submission to run created (the daemon's pass over backfills)": created - submitted,
        "run created to run start (queue, launch, process start)": times["RUN_START"] - created,
        "run start to step start": times["STEP_START"] - times["RUN_START"],
        "step outside the work queue": step - queue_duration_s,
        "step end to run end": run_end - step_end,
        **{f"step {key}": max(stamps) - min(stamps) for key, stamps in steps.items()},
    }


def _wait_for_daemon(instance: dg.DagsterInstance, daemon: subprocess.Popen, log_file: Path) -> float:
    """Waits for the run queue and the backfill daemon; returns when the backfill daemon's first pass
    began (its first heartbeat is written just before it)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"dagster-daemon exited with {daemon.returncode}: {log_file.read_text()[-2000:]}")
        heartbeats = instance.get_daemon_heartbeats()
        if "QUEUED_RUN_COORDINATOR" in heartbeats and "BACKFILL" in heartbeats:
            return heartbeats["BACKFILL"].timestamp
        time.sleep(0.2)
    raise TimeoutError(f"dagster-daemon sent no heartbeat within 120 s: {log_file.read_text()[-2000:]}")


def _wait_for_backfill(instance: dg.DagsterInstance, backfill_id: str, deadline: float, log_file: Path) -> list:
    from dagster._core.execution.backfill import BulkActionStatus

    finished = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
    while time.time() < deadline:
        backfill = instance.get_backfill(backfill_id)
        records = instance.get_run_records(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        if (
            backfill.status != BulkActionStatus.REQUESTED
            and records
            and all(r.dagster_run.status in finished for r in records)
        ):
            return records
        time.sleep(0.5)
    raise TimeoutError(f"P3: the backfill did not finish in time; daemon log: {log_file.read_text()[-3000:]}")
