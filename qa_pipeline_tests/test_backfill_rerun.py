"""On a real Dagster instance: a backfill's failed partitions re-run alone, and run termination is graceful.

Backfills are launched, re-executed and runs terminated with the GraphQL mutations the Dagster UI sends,
against the project's code location loaded from workspace.yaml as `dagster dev` loads it. Two pieces
differ from production, for time only:
- the backfill daemon's loop: the test calls the daemon's own iteration (the code `dagster-daemon run`
  executes every 30 seconds) whenever it wants the next step, instead of waiting for 30-second ticks;
- in the backfill test, the backfill's runs wait in the run queue and the test dequeues them into the
  test process (Dagster's SyncInMemoryRunLauncher), as the run-queue daemon would into run workers:
  ten run-worker processes take minutes to start on a shared 2-core machine. The termination test
  launches a real run worker (DefaultRunLauncher), since the signal path through it is the point.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster._daemon.backfill import execute_backfill_iteration
from dagster_graphql.test.utils import execute_dagster_graphql

from qa_pipeline.core.layout import DataLayout
from qa_pipeline.simulator.server import passage_key
from qa_pipeline.core.storage import Storage
from qa_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, documents
from qa_pipeline.defs.sensors import sync_document_partitions
from qa_pipeline_tests.conftest import REPO, cli_env, run_cli

FAST = {"step_base_ms": 1, "step_per_seq_ms": 0.05, "output_tokens_mean": 30, "output_tokens_max": 200}
MARKER = "QUARANTINED"
# The run config a user would put in the backfill dialog: a fixed concurrency, quick retries.
RUN_CONFIG = {
    "ops": {"qa_pairs": {"config": {"concurrency": 4, "max_tokens": 512}}},
    "resources": {"llm": {"config": {"max_retries": 1, "backoff_base_s": 0.05}}},
}
LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
REEXECUTE_BACKFILL = """
mutation($params: ReexecutionParams!) {
  reexecutePartitionBackfill(reexecutionParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
TERMINATE_RUN = """
mutation($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunFailure { message }
    ... on PythonError { message }
  }
}"""
DAGSTER_YAML = """
telemetry:
  enabled: false
"""
RUN_WORKERS = """
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
"""
IN_PROCESS_RUNS = """
run_launcher:
  module: dagster._core.launcher.sync_in_memory_run_launcher
  class: SyncInMemoryRunLauncher
"""


class Dagster:
    """A temporary instance, the project's code location as `dagster dev` loads it, and GraphQL on it."""

    def __init__(self, instance: dg.DagsterInstance, workspace: WorkspaceProcessContext):
        self.instance = instance
        self.workspace = workspace

    def graphql(self, query: str, variables: dict) -> dict:
        result = execute_dagster_graphql(self.workspace.create_request_context(), query, variables)
        assert not result.errors, result.errors
        (answer,) = result.data.values()
        assert answer["__typename"] in ("LaunchBackfillSuccess", "TerminateRunSuccess"), answer
        return answer

    def launch_backfill(self, partitions: list[str]) -> str:
        params = {
            "assetSelection": [{"path": ["chunks"]}, {"path": ["qa_pairs"]}],
            "partitionNames": partitions,
            "runConfigData": RUN_CONFIG,
        }
        return self.graphql(LAUNCH_BACKFILL, {"params": params})["backfillId"]

    def reexecute_from_failure(self, backfill_id: str) -> str:
        params = {"parentRunId": backfill_id, "strategy": "FROM_FAILURE"}
        return self.graphql(REEXECUTE_BACKFILL, {"params": params})["backfillId"]

    def daemon_step(self) -> None:
        list(execute_backfill_iteration(self.workspace, logging.getLogger("backfill daemon")))
        queued = self.instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
        for run in reversed(queued):  # oldest first, as the run queue does
            self.instance.launch_run(run.run_id, self.workspace.create_request_context())

    def finish_backfill(self, backfill_id: str, timeout_s: float = 240) -> BulkActionStatus:
        deadline = time.monotonic() + timeout_s
        while (status := self.instance.get_backfill(backfill_id).status) == BulkActionStatus.REQUESTED:
            assert time.monotonic() < deadline, f"backfill {backfill_id} still running after {timeout_s} s"
            self.daemon_step()
            time.sleep(0.5)
        return status

    def runs_by_partition(self, backfill_id: str) -> dict[str, dg.DagsterRun]:
        """Each document of the backfill and the run that covered it (a run covers a range of documents)."""
        runs = self.instance.get_runs(dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        return {key: run for run in runs for key in self.partitions_of(run)}

    def partitions_of(self, run: dg.DagsterRun) -> list[str]:
        if PARTITION_NAME_TAG in run.tags:
            return [run.tags[PARTITION_NAME_TAG]]
        order = self.instance.get_dynamic_partitions("documents")
        start, end = order.index(run.tags[RANGE_START_TAG]), order.index(run.tags[RANGE_END_TAG])
        return order[start : end + 1]


@contextmanager
def dagster_on(
    tmp_path: Path, base_url: str, monkeypatch, in_process_runs: bool = False
) -> Iterator[tuple[Dagster, DataLayout]]:
    """`DAGSTER_HOME`, data folder and LLM endpoint as a user sets them before `dagster dev`."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML + (IN_PROCESS_RUNS if in_process_runs else RUN_WORKERS))
    layout = DataLayout(tmp_path / "data")
    layout.sources_dir.mkdir(parents=True, exist_ok=True)
    for name, value in cli_env(layout.root, base_url).items():
        monkeypatch.setenv(name, value)  # the code server and the run workers inherit them
    with dg.DagsterInstance.get() as instance:
        with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")])) as workspace:
            yield Dagster(instance, workspace), layout


def write_document(layout: DataLayout, index: int, marked: bool) -> list[str]:
    """A document of three sections (three chunks); a marked one has the marker in its second section."""
    parts = [
        f"Document {index}, part {part}: the archive job keeps {part + index} copies for {index + 3} days."
        + (f" It is {MARKER} until the audit ends." if marked and part == 1 else "")
        for part in range(3)
    ]
    body = "\n\n".join(f"## Part {part}\n\n{text}" for part, text in enumerate(parts))
    (layout.sources_dir / f"doc-{index:02d}.md").write_text(f"# Document {index}\n\n{body}\n")
    return parts


def test_a_backfill_fails_exactly_the_bad_partitions_and_re_execution_from_failure_reruns_only_their_failed_chunks(
    simulator, tmp_path, monkeypatch
):
    sim = simulator(**FAST, fail_if_contains=[MARKER])
    with dagster_on(tmp_path, sim.base_url, monkeypatch, in_process_runs=True) as (dagster, layout):
        marked = {3, 7}
        texts = {i: write_document(layout, i, i in marked) for i in range(10)}
        sync_document_partitions(dagster.instance, layout)
        partitions = sorted(dagster.instance.get_dynamic_partitions("documents"))
        assert len(partitions) == 10

        first = dagster.launch_backfill(partitions)
        assert dagster.finish_backfill(first) == BulkActionStatus.COMPLETED_FAILED
        runs = dagster.runs_by_partition(first)
        assert len({run.run_id for run in runs.values()}) == 1, "one run covers the ten documents"
        statuses = dagster.instance.get_status_by_partition(dg.AssetKey("qa_pairs"), partitions, documents)
        failed = {key for key, status in statuses.items() if status == dg.AssetPartitionStatus.FAILED}
        assert failed == {"doc-03.md", "doc-07.md"}
        assert all(statuses[key] == dg.AssetPartitionStatus.MATERIALIZED for key in set(partitions) - failed)
        failures = Storage(layout).query("SELECT document, reason, http_status FROM failures ORDER BY 1").to_dicts()
        assert failures == [
            {"document": "doc-03.md", "reason": "http_error", "http_status": 500},
            {"document": "doc-07.md", "reason": "http_error", "http_status": 500},
        ]

        sim.set_faults()  # the cause is fixed
        sim.reset_stats()
        second = dagster.reexecute_from_failure(first)
        assert dagster.finish_backfill(second) == BulkActionStatus.COMPLETED_SUCCESS
        rerun = dagster.runs_by_partition(second)
        assert set(rerun) == {"doc-03.md", "doc-07.md"}
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in rerun.values())
        assert all(run.asset_selection == {dg.AssetKey("qa_pairs")} for run in rerun.values())

        # Inside each re-run partition only the chunk that had failed was sent again.
        sent = sim.stats()["requests_by_passage"]
        assert sent == {passage_key(texts[3][1]): 1, passage_key(texts[7][1]): 1}
        pairs = Storage(layout).query("SELECT count(DISTINCT chunk_id) AS chunks FROM qa_pairs").to_dicts()
        assert pairs == [{"chunks": 30}]
        assert Storage(layout).query("SELECT * FROM failures").height == 0


def test_terminating_a_dagster_run_lets_requests_in_flight_finish_and_the_next_run_resends_nothing(
    simulator, tmp_path, monkeypatch
):
    # About a quarter of a second per request, so requests are always in flight.
    sim = simulator(max_num_seqs=64, step_base_ms=5, step_per_seq_ms=0, output_tokens_mean=50, output_tokens_sigma=0)
    with dagster_on(tmp_path, sim.base_url, monkeypatch) as (dagster, layout):
        texts = [f"Record {i}: the nightly export writes {i * 11} rows to table t{i % 7}." for i in range(300)]
        source = layout.sources_dir / "records.jsonl"
        source.write_text("".join(json.dumps({"content": text}) + "\n" for text in texts))
        sync_document_partitions(dagster.instance, layout)
        journal = layout.journal_file("records.jsonl")

        backfill = dagster.launch_backfill(["records.jsonl"])
        deadline = time.monotonic() + 120
        while not (journal.exists() and len(journal.read_text().splitlines()) >= 20):
            assert time.monotonic() < deadline, "the run did not start generating"
            if not dagster.runs_by_partition(backfill):
                dagster.daemon_step()
            time.sleep(0.1)
        (run,) = dagster.runs_by_partition(backfill).values()
        dagster.graphql(TERMINATE_RUN, {"runId": run.run_id})

        deadline = time.monotonic() + 60
        while dagster.instance.get_run_by_id(run.run_id).status != dg.DagsterRunStatus.CANCELED:
            assert time.monotonic() < deadline, dagster.instance.get_run_by_id(run.run_id).status
            time.sleep(0.2)
        messages = [entry.message for entry in dagster.instance.all_logs(run.run_id)]
        assert any("SIGINT received: stopping" in message for message in messages)

        lines = journal.read_text().splitlines(keepends=True)
        assert all(line.endswith("\n") and json.loads(line) for line in lines)
        stats = sim.stats()
        assert stats["aborted"] == 0, "requests in flight were allowed to finish"
        assert stats["requests_total"] == len(lines) < 300, "every request sent was saved, and no new one started"

        env = cli_env(layout.root, sim.base_url)
        run_cli("run", "--skip-benchmark", "--concurrency", "8", "--max-tokens", "512", env=env)
        sent = sim.stats()["requests_by_passage"]
        assert [sent.get(passage_key(text)) for text in texts] == [1] * 300, "no chunk was sent twice"
