"""Benchmarks P6 and P7 on the documentation-site corpus (benchmarks/doc_site.py), as a user runs them.

P6: the default `qa-pipeline run` as a subprocess, with only QA_PIPELINE_LLM_BASE_URL set, on a fresh
data folder (and so a fresh DAGSTER_HOME under it). P7: then `dagster-daemon run` starts on the same
DAGSTER_HOME with deploy/dagster-dev.yaml and the project's workspace.yaml; once the sources sensor has
ticked, pages are edited and the sensor regenerates them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import dagster as dg

from benchmarks.doc_site import Page, revise_pages
from benchmarks.workloads import REPO

QA_PAIRS, CHUNKS = dg.AssetKey("qa_pairs"), dg.AssetKey("chunks")
BENCHMARK, REPORT = dg.AssetKey("concurrency_benchmark"), dg.AssetKey("quality_report")
SENSOR = "source_documents_sensor"
BIN = Path(sys.executable).parent


def clean_environment(**variables: str) -> dict[str, str]:
    """This process's environment without any qa_pipeline or Dagster setting, plus `variables`."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("QA_PIPELINE_", "DAGSTER_"))}
    return {**kept, **variables}


@dataclass
class Span:
    """One request as the journal recorded it: sent (finish minus latency), finished, output tokens."""

    sent: float
    finished: float
    tokens: int


def journal_spans(data: Path, since: float = 0.0) -> list[Span]:
    """Every request recorded in the data folder's journals that finished after `since` (time.time())."""
    spans = []
    for path in (data / "journal").glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            finished = datetime.fromisoformat(record["finished_at"]).timestamp()
            if finished > since:
                spans.append(Span(finished - record["latency_s"], finished, record["completion_tokens"]))
    return spans


def busy_seconds(spans: list[Span]) -> float:
    """Time with at least one request in flight."""
    busy, end = 0.0, float("-inf")
    for span in sorted(spans, key=lambda s: s.sent):
        if span.finished <= end:
            continue
        busy += span.finished - max(span.sent, end)
        end = span.finished
    return busy


@dataclass
class RunSpan:
    kind: str  # "chunks", "benchmark", "qa_pairs", "report" or "other"
    created: float
    started: float
    ended: float
    step_s: dict[str, float]


def _kind(run: dg.DagsterRun) -> str:
    selection = run.asset_selection or frozenset()
    for key, kind in ((QA_PAIRS, "qa_pairs"), (BENCHMARK, "benchmark"), (CHUNKS, "chunks"), (REPORT, "report")):
        if key in selection:
            return kind
    return "other"


def run_spans(instance: dg.DagsterInstance, created_after: float = 0.0) -> list[RunSpan]:
    """Every finished run of the instance created after `created_after`, in creation order, with its steps' durations."""
    spans = []
    for record in instance.get_run_records(order_by="create_timestamp", ascending=True):
        created = record.create_timestamp.timestamp()
        if created < created_after or not record.end_time:
            continue
        run = record.dagster_run
        steps: dict[str, list[float]] = {}
        for entry in instance.all_logs(run.run_id, of_type={
            dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE
        }):
            steps.setdefault(entry.step_key, []).append(entry.timestamp)
        spans.append(RunSpan(
            _kind(run), created, record.start_time or created, record.end_time,
            {key: max(times) - min(times) for key, times in steps.items()},
        ))
    return spans


@dataclass
class CliRun:
    """P6: what `qa-pipeline run` did, timed from outside and from its own records."""

    documents_per_run: str
    pages: int
    chunks: int
    wall_s: float
    output_tokens: int  # generation (qa_pairs) only, from the journals
    generation_s: float  # first generation request sent to the last answer
    busy_s: float  # of which with at least one request in flight
    runs: dict[str, int]
    phases: dict[str, float]
    exit_code: int
    simulator_tokens: int  # every output token the server produced meanwhile, the sweep's included
    log_tail: str = ""

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.generation_s if self.generation_s else 0.0


def run_cli(
    base_url: str,
    root: Path,
    pages: list[Page],
    ceiling: float,
    output_tokens_total: Callable[[], int],
    documents_per_run: str | None = None,
    log: Callable[[str], None] = print,
    timeout_s: float = 3600.0,
) -> CliRun:
    """`qa-pipeline run` in `root` (its ./data holds the sources), as a user starts it."""
    data = root / "data"
    variables = {"QA_PIPELINE_LLM_BASE_URL": base_url}
    if documents_per_run:
        variables["QA_PIPELINE_DOCUMENTS_PER_RUN"] = documents_per_run
    tokens_before = output_tokens_total()
    log_file = root / "qa-pipeline-run.log"
    started = time.time()
    with log_file.open("w") as output:
        completed = subprocess.run(
            [str(BIN / "qa-pipeline"), "run"], cwd=root, env=clean_environment(**variables),
            stdout=output, stderr=subprocess.STDOUT, timeout=timeout_s,
        )
    ended = time.time()
    simulator_tokens = output_tokens_total() - tokens_before
    tail = "\n".join(log_file.read_text().splitlines()[-15:])
    if completed.returncode != 0:
        log(f"qa-pipeline run exited with {completed.returncode}; the end of its output:\n{tail}")
    spans = journal_spans(data)
    if not spans:
        raise RuntimeError(f"qa-pipeline run sent no generation request; the end of its output:\n{tail}")
    first_sent, last_answer = min(s.sent for s in spans), max(s.finished for s in spans)
    tokens = sum(s.tokens for s in spans)
    with dg.DagsterInstance.from_config(str(data / "dagster_home")) as instance:
        runs = run_spans(instance)
    by_kind = {kind: [r for r in runs if r.kind == kind] for kind in ("chunks", "benchmark", "qa_pairs")}
    phases = _cli_phases(started, ended, runs, by_kind, first_sent, last_answer, tokens / ceiling)
    return CliRun(
        documents_per_run=documents_per_run or "default",
        pages=len(pages),
        chunks=len(spans),
        wall_s=ended - started,
        output_tokens=tokens,
        generation_s=last_answer - first_sent,
        busy_s=busy_seconds(spans),
        runs={kind: len(items) for kind, items in by_kind.items()},
        phases=phases,
        exit_code=completed.returncode,
        simulator_tokens=simulator_tokens,
        log_tail=tail,
    )


def _cli_phases(
    started: float, ended: float, runs: list[RunSpan], by_kind: dict[str, list[RunSpan]],
    first_sent: float, last_answer: float, at_ceiling_s: float,
) -> dict[str, float]:
    """The command's wall time cut at its runs' boundaries and at the first and last generation request."""
    if not runs or not all(by_kind.values()):
        return {}
    chunking, benchmark, generation = by_kind["chunks"], by_kind["benchmark"], by_kind["qa_pairs"]
    report_step = sum(r.step_s.get("quality_report", 0.0) for r in generation)
    between_qa_runs = sum(
        max(0.0, later.started - earlier.ended) for earlier, later in zip(generation, generation[1:])
    )
    return {
        "start-up (imports, instance, partition sync) until the first run starts": runs[0].started - started,
        f"chunking ({len(chunking)} run(s))": chunking[-1].ended - chunking[0].started,
        "concurrency benchmark run (test_sample + sweep)": benchmark[-1].ended - chunking[-1].ended,
        "first qa_pairs run's start-up until its first request": first_sent - benchmark[-1].ended,
        "generation at the ceiling (output tokens / ceiling)": at_ceiling_s,
        "generation below the ceiling (ramp-up, long tail"
        + (", runs starting and ending" if len(generation) > 1 else "") + ")": last_answer - first_sent - at_ceiling_s,
        "last answer to the end of the last run (publishing, events, quality_report)": generation[-1].ended - last_answer,
        "after the last run (report printed, exit)": ended - generation[-1].ended,
        # Not a phase: parts of the phases above, for the record.
        "[in the generation phase: time between two qa_pairs runs]": between_qa_runs,
        "[in the last run: the quality_report step]": report_step,
    }


# --- P7 -------------------------------------------------------------------------------------------


@dataclass
class SensorRun:
    """P7: from the sensor's tick that requested the runs to the last `qa_pairs` materialization."""

    pages_changed: int
    requests: int  # generation requests the server answered (cache misses)
    output_tokens: int
    duration_s: float  # the tick's start to the last qa_pairs materialization
    runs: int  # runs the sensor requested
    ticks_with_runs: int
    documents_in_runs: int  # changed ones and the unchanged ones between them, re-published from cache
    generation_s: float  # first generation request to the last answer
    longest_request_s: float  # the slowest request: no schedule ends the generation before it does
    report_after_s: float | None  # the report sensor's refresh, done this long after the last qa_pairs
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0


def regenerate_through_sensor(
    base_url: str,
    root: Path,
    pages: list[Page],
    simulator_stats: Callable[[], dict],
    log: Callable[[str], None] = print,
    every: int = 6,
    sensor_interval_s: int = 5,
    documents_per_run: str | None = None,
    timeout_s: float = 1800.0,
) -> SensorRun:
    """Runs `dagster-daemon run` as deploy/dagster-dev.yaml says and, once the sources sensor has ticked
    (the daemon is up, as a user's is when they edit), edits every `every`-th page (again, if an earlier
    call edited them); waits until the sensor's runs have regenerated them, and until the report
    sensor's refresh is done, so that the next call starts from a quiet instance."""
    data = root / "data"
    home = data / "dagster_home"
    shutil.copy(REPO / "deploy" / "dagster-dev.yaml", home / "dagster.yaml")
    env = clean_environment(
        DAGSTER_HOME=str(home),
        QA_PIPELINE_DATA_DIR=str(data),
        QA_PIPELINE_LLM_BASE_URL=base_url,
        QA_PIPELINE_SOURCES_SENSOR_INTERVAL_S=str(sensor_interval_s),
        **({"QA_PIPELINE_DOCUMENTS_PER_RUN": documents_per_run} if documents_per_run else {}),
    )
    log_file = root / "daemon.log"
    daemon_started = time.time()
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
        cwd=root, env=env, stdout=log_file.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            _wait_for_tick(instance, daemon, daemon_started, log_file, timeout_s)
            before = simulator_stats()
            changed = revise_pages(pages, data / "sources", every=every)
            edited_at = time.time()
            log(f"P7: the daemon is up; {len(changed)} of {len(pages)} pages edited (every {every}th)")
            tick, run_ids = _wait_for_tick(instance, daemon, edited_at, log_file, timeout_s, requesting=True)
            log(f"P7: the sensor's tick requested {len(run_ids)} run(s); waiting for them")
            records = _wait_for_runs(instance, run_ids, daemon, log_file, tick.timestamp + timeout_s)
            last = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=QA_PAIRS), limit=1).records[0]
            after = simulator_stats()
            ticks_with_runs = sum(1 for t in _sensor_ticks(instance, daemon_started) if t.run_ids)
            spans = run_spans(instance, created_after=tick.timestamp - 1)
            documents = sum(_documents_of(instance, record.dagster_run.tags) for record in records)
            report_after_s = _wait_for_report(instance, last, daemon, log_file)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
    failed = [r for r in records if r.dagster_run.status != dg.DagsterRunStatus.SUCCESS]
    if failed:
        log(f"P7: {len(failed)} of the sensor's runs did not succeed; see {log_file}")
    end = last.timestamp
    requests = journal_spans(data, since=tick.timestamp)
    qa_runs = [span for span in spans if span.kind == "qa_pairs"]
    phases = _sensor_phases(tick.timestamp, qa_runs, requests, end, after["ceiling_output_tokens_per_s"])
    return SensorRun(
        pages_changed=len(changed),
        requests=after["requests_total"] - before["requests_total"],
        output_tokens=after["output_tokens_total"] - before["output_tokens_total"],
        duration_s=end - tick.timestamp,
        runs=len(run_ids),
        ticks_with_runs=ticks_with_runs,
        documents_in_runs=documents,
        generation_s=max(s.finished for s in requests) - min(s.sent for s in requests) if requests else 0.0,
        longest_request_s=max((s.finished - s.sent for s in requests), default=0.0),
        report_after_s=report_after_s,
        phases=phases,
    )


def _documents_of(instance: dg.DagsterInstance, tags: dict) -> int:
    if "dagster/asset_partition_range_start" not in tags:
        return 1
    keys = instance.get_dynamic_partitions("documents")
    return keys.index(tags["dagster/asset_partition_range_end"]) - keys.index(tags["dagster/asset_partition_range_start"]) + 1


def _sensor_ticks(instance: dg.DagsterInstance, since: float) -> list:
    """The sources sensor's ticks since `since` (time.time())."""
    for state in instance.all_instigator_state():
        if state.name == SENSOR:
            return list(instance.get_ticks(state.instigator_origin_id, state.selector_id, after=since))
    return []


def _wait_for_tick(instance, daemon, since: float, log_file: Path, timeout_s: float, requesting: bool = False):
    """The first tick of the sources sensor since `since` (with `requesting`, the first that requested
    runs), and its runs."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"dagster-daemon exited with {daemon.returncode}: {log_file.read_text()[-2000:]}")
        ticks = [t for t in _sensor_ticks(instance, since) if t.run_ids or not requesting]
        if ticks:
            tick = min(ticks, key=lambda t: t.timestamp)
            return tick, list(tick.run_ids)
        time.sleep(0.5)
    what = "requested no run" if requesting else "did not tick"
    raise TimeoutError(f"P7: the sources sensor {what} within {timeout_s:.0f} s: {log_file.read_text()[-3000:]}")


def _wait_for_runs(instance, run_ids: list[str], daemon, log_file: Path, deadline: float) -> list:
    finished = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
    while time.time() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"dagster-daemon exited with {daemon.returncode}: {log_file.read_text()[-2000:]}")
        records = instance.get_run_records(dg.RunsFilter(run_ids=run_ids))
        if len(records) == len(run_ids) and all(r.dagster_run.status in finished for r in records):
            return records
        time.sleep(0.5)
    raise TimeoutError(f"P7: the sensor's runs did not finish in time: {log_file.read_text()[-3000:]}")


def _wait_for_report(instance, last_qa_pairs, daemon, log_file: Path, timeout_s: float = 300.0) -> float | None:
    """Seconds from the last `qa_pairs` materialization to the refreshed report (None: not within the timeout)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"dagster-daemon exited with {daemon.returncode}: {log_file.read_text()[-2000:]}")
        reports = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=REPORT), limit=1).records
        if reports and reports[0].storage_id > last_qa_pairs.storage_id:
            return reports[0].timestamp - last_qa_pairs.timestamp
        time.sleep(1.0)
    return None


def _sensor_phases(
    tick_at: float, runs: list[RunSpan], requests: list[Span], end: float, ceiling: float
) -> dict[str, float]:
    """From the tick to the last materialization, cut at the first run's start and at the first and
    last generation request."""
    if not runs or not requests:
        return {}
    first = min(runs, key=lambda r: r.created)
    first_sent, last_answer = min(s.sent for s in requests), max(s.finished for s in requests)
    at_ceiling = sum(s.tokens for s in requests) / ceiling
    return {
        "tick to the first run's creation": first.created - tick_at,
        "run created to started (run queue, launch, process start)": first.started - first.created,
        "run start to the first request (`chunks` step, reading chunks, cache look-ups)": first_sent - first.started,
        "generation at the ceiling (output tokens / ceiling)": at_ceiling,
        "generation below the ceiling (ramp-up, tail"
        + (", runs starting and ending" if len(runs) > 1 else "") + ")": last_answer - first_sent - at_ceiling,
        "last answer to the last qa_pairs materialization (publishing, events)": end - last_answer,
        "[the first run's `chunks` step]": first.step_s.get("chunks", 0.0),
        "[the first run's `qa_pairs` step]": first.step_s.get("qa_pairs", 0.0),
    }
