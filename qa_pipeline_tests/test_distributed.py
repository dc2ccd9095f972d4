"""Beyond one machine: Dagster on PostgreSQL with the queued run coordinator, a backfill over many
documents run by the real daemon, and three LLM endpoints, one of which dies half way.

Everything runs as the deployment in deploy/ runs it: a code server (`dagster code-server start`,
what the Dockerfile starts), `dagster-webserver` and `dagster-daemon` on loopback, all sharing the
instance configuration deploy/dagster.yaml, pointed at a fresh database on the test PostgreSQL.
The backfill is launched the way the UI launches it, with the `launchPartitionBackfill` GraphQL
mutation on the webserver; with QA_PIPELINE_DOCUMENTS_PER_RUN=2 the daemon's backfill loop turns it
into runs of two documents (as a cluster spreads a backfill over machines) and its run queue starts
them within the configured limits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from qa_pipeline_tests.conftest import REPO, cli_env, sql

pytestmark = pytest.mark.postgres

POSTGRES_URL_ENV = "QA_PIPELINE_TEST_POSTGRES_URL"
BIN = Path(sys.executable).parent
DOCUMENTS = 20
DOCUMENTS_PER_RUN = 2
CHUNKS_PER_DOCUMENT = 3
QUESTION_TYPES = 3
# A step of 30 ms makes each answer take seconds, so each run lasts longer than the run queue takes to
# start the next ones: the runs overlap however busy the machine is.
SIMULATOR = {"max_num_seqs": 32, "step_base_ms": 30, "output_tokens_mean": 60, "output_tokens_max": 150}


@dataclass(frozen=True)
class Database:
    """A database of its own on the test server, and the DAGSTER_POSTGRES_* variables that reach it."""

    url: str
    env: dict[str, str]


@pytest.fixture
def postgres_database() -> Iterator[Database]:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        reason = (
            f"{POSTGRES_URL_ENV} is not set: start a test server with "
            f'eval "$(bash scripts/start-postgres.sh)"'
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL tests, but {reason}")
        pytest.skip(reason)
    import psycopg2

    name = f"qa_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(url)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(url)
    try:
        yield Database(
            url=urlunsplit(parts._replace(path=f"/{name}")),
            env={
                "DAGSTER_POSTGRES_HOST": parts.hostname or "127.0.0.1",
                "DAGSTER_POSTGRES_PORT": str(parts.port or 5432),
                "DAGSTER_POSTGRES_USER": parts.username or "",
                "DAGSTER_POSTGRES_PASSWORD": parts.password or "",
                "DAGSTER_POSTGRES_DB": name,
            },
        )
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """A Dagster process started for the test, in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path):
        self.name = name
        self.log = cwd / f"{name}.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the group it leads (run workers a code server started are in it too), then SIGKILL."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    if body.get("errors"):
        raise AssertionError(f"GraphQL errors: {body['errors']}")
    return body["data"]


def wait_for(condition, timeout_s: float, what: str, services: list[Service], interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for service in services:
            service.check_running()
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    logs = "\n".join(f"--- {s.name} ---\n{s.tail()}" for s in services)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")


WORKSPACE_LOADED = """{ workspaceOrError { ... on Workspace { locationEntries {
    name locationOrLoadError { __typename ... on PythonError { message } } } } } }"""

INSTIGATORS = """{ repositoriesOrError { ... on RepositoryConnection { nodes {
    sensors { name sensorState { id status } }
    schedules { name scheduleState { id status } } } } } }"""

STOP_SENSOR = """mutation($id: String) { stopSensor(id: $id) {
    __typename ... on PythonError { message } } }"""

STOP_SCHEDULE = """mutation($id: String) { stopRunningSchedule(id: $id) {
    __typename ... on PythonError { message } } }"""

LAUNCH_BACKFILL = """mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on PartitionKeysNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}"""

BACKFILL_STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
    __typename ... on PartitionBackfill { status } } }"""


def location_loaded(port: int) -> bool:
    try:
        entries = graphql(port, WORKSPACE_LOADED)["workspaceOrError"]["locationEntries"]
    except OSError:
        return False
    loaded = entries and entries[0]["locationOrLoadError"]
    if loaded and loaded["__typename"] == "PythonError":
        raise AssertionError(f"the code location failed to load: {loaded['message']}")
    return bool(loaded and loaded["__typename"] == "RepositoryLocation")


def stop_automation(port: int) -> None:
    """Only the backfill may start runs here: sensors and schedules that default to running are stopped."""
    for repository in graphql(port, INSTIGATORS)["repositoriesOrError"]["nodes"]:
        for sensor in repository["sensors"]:
            if sensor["sensorState"]["status"] == "RUNNING":
                result = graphql(port, STOP_SENSOR, {"id": sensor["sensorState"]["id"]})["stopSensor"]
                assert result["__typename"] == "StopSensorMutationResult", result
        for schedule in repository["schedules"]:
            if schedule["scheduleState"]["status"] == "RUNNING":
                result = graphql(port, STOP_SCHEDULE, {"id": schedule["scheduleState"]["id"]})
                assert result["stopRunningSchedule"]["__typename"] == "ScheduleStateResult", result


def write_documents(sources: Path) -> list[str]:
    """Small pre-chunked documents: every line is one chunk, so the expected chunks are known exactly."""
    keys = []
    for number in range(DOCUMENTS):
        key = f"service-{number:02d}.jsonl"
        lines = [
            json.dumps(
                {
                    "content": f"Service {number} handles request kind {part}. It retries failed calls with "
                    f"backoff, records every failure with its reason, and reports its queue length.",
                    "metadata": {"service": f"service-{number:02d}"},
                }
            )
            for part in range(CHUNKS_PER_DOCUMENT)
        ]
        (sources / key).write_text("\n".join(lines) + "\n")
        keys.append(key)
    return keys


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_backfill_over_many_documents_survives_an_endpoint_dying(tmp_path, simulator, postgres_database):
    import dagster as dg

    sims = [simulator(**SIMULATOR) for _ in range(3)]
    victim = sims[1]
    data_dir = tmp_path / "data"
    (data_dir / "sources").mkdir(parents=True)
    keys = write_documents(data_dir / "sources")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "deploy" / "dagster.yaml").read_text())
    code_port, web_port = free_port(), free_port()
    (tmp_path / "workspace.yaml").write_text(
        "load_from:\n  - grpc_server:\n"
        f"      host: 127.0.0.1\n      port: {code_port}\n      location_name: qa_pipeline\n"
    )
    env = cli_env(
        data_dir,
        ",".join(s.base_url for s in sims),
        DAGSTER_HOME=str(home),
        QA_PIPELINE_DOCUMENTS_PER_RUN=str(DOCUMENTS_PER_RUN),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **postgres_database.env,
    )

    services: list[Service] = []
    try:
        services.append(
            Service(
                "code-server",
                [str(BIN / "dagster"), "code-server", "start", "-h", "127.0.0.1", "-p", str(code_port),
                 "-m", "qa_pipeline.definitions", "--location-name", "qa_pipeline",
                 "--use-python-environment-entry-point"],
                env, tmp_path,
            )
        )
        code_server = services[0]
        wait_for(
            lambda: "Started Dagster code proxy server" in code_server.log.read_text(errors="replace"),
            180, "the code server to load the definitions", services,
        )
        services.append(
            Service(
                "webserver",
                [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(web_port), "-w", "workspace.yaml"],
                env, tmp_path,
            )
        )
        # The test process is one more client of the same instance: it adds the partitions, as the
        # sensor or `qa-pipeline run` would, and reads runs and materializations.
        os.environ.update({k: v for k, v in env.items() if k.startswith("DAGSTER_")})
        instance = dg.DagsterInstance.from_config(str(home))
        instance.add_dynamic_partitions("documents", keys)
        # One generating step per LLM endpoint, as deploy/README.md says for several replicas (what
        # `dagster instance concurrency set llm_server 3` does).
        instance.event_log_storage.set_concurrency_slots("llm_server", len(sims))
        wait_for(lambda: location_loaded(web_port), 180, "the webserver to load the code location", services)
        stop_automation(web_port)

        launched = graphql(
            web_port,
            LAUNCH_BACKFILL,
            {
                "params": {
                    "assetSelection": [{"path": ["chunks"]}, {"path": ["qa_pairs"]}],
                    "partitionNames": keys,
                    "title": "distributed test",
                    # The code location's default executor is in-process: one process per run.
                    "runConfigData": {
                        "ops": {"qa_pairs": {"config": {"concurrency": 8, "max_tokens": 256}}},
                    },
                }
            },
        )["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]
        # Started after the backfill is stored, so its first backfill iteration sees it at once.
        services.append(Service("daemon", [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env, tmp_path))

        def materialized() -> set[str]:
            return set(instance.get_materialized_partitions(dg.AssetKey("qa_pairs")))

        wait_for(lambda: len(materialized()) >= DOCUMENTS // 3, 600, "a third of the documents", services, 0.3)
        victim_requests_before_kill = victim.stats()["requests_total"]
        victim.kill()
        killed_with = len(materialized())
        # Relative to what was done at the kill (more may land between the wait and the kill on a busy machine).
        wait_for(
            lambda: len(materialized()) >= killed_with + 2, 300,
            "documents to finish while an endpoint is down", services, 0.3,
        )
        victim.restart()
        restarted_with = len(materialized())

        def finished() -> str | None:
            status = graphql(web_port, BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]["status"]
            return status if status not in ("REQUESTED", "CANCELING") else None

        status = wait_for(finished, 600, "the backfill to finish", services, 1.0)
        runs = instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    finally:
        for service in reversed(services):
            service.stop()

    # Every partition materialized, by successful runs of two documents, at least 4 of them at once.
    assert status == "COMPLETED_SUCCESS", status
    assert materialized() == set(keys)
    assert len(runs) == DOCUMENTS // DOCUMENTS_PER_RUN
    assert {r.dagster_run.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
    intervals = [(r.start_time, r.end_time) for r in runs]
    assert max_overlap(intervals) >= 4, f"at most {max_overlap(intervals)} runs were in progress at once"
    assert DOCUMENTS // 3 <= killed_with < restarted_with < DOCUMENTS

    # No chunk lost or duplicated: every chunk once, each with one pair per question type.
    query_env = cli_env(data_dir)
    chunk_counts = sql("SELECT document, count(*) AS n, count(DISTINCT chunk_id) AS ids FROM chunks GROUP BY 1", query_env)
    assert {(r["document"], r["n"], r["ids"]) for r in chunk_counts} == {
        (key, CHUNKS_PER_DOCUMENT, CHUNKS_PER_DOCUMENT) for key in keys
    }
    assert sql("SELECT count(*) AS n FROM failures", query_env) == [{"n": 0}]
    per_chunk = sql(
        """SELECT c.chunk_id, count(q.chunk_id) AS pairs FROM chunks c
           LEFT JOIN qa_pairs q ON q.chunk_id = c.chunk_id GROUP BY 1""",
        query_env,
    )
    assert len(per_chunk) == DOCUMENTS * CHUNKS_PER_DOCUMENT
    assert {r["pairs"] for r in per_chunk} == {QUESTION_TYPES}

    # Load spread over the live endpoints: the two that never died each served a fair share, the
    # killed one served before it died and again after its restart.
    served = sql("SELECT endpoint, count(*) AS n FROM qa_pairs GROUP BY 1", query_env)
    by_endpoint = {r["endpoint"]: r["n"] // QUESTION_TYPES for r in served}
    total = DOCUMENTS * CHUNKS_PER_DOCUMENT
    for sim in (sims[0], sims[2]):
        assert sim.stats()["completed"] >= total // 5, by_endpoint
        assert by_endpoint.get(sim.openai_base_url, 0) >= total // 5, by_endpoint
    assert victim_requests_before_kill > 0
    assert victim.stats()["requests_total"] > 0, "the restarted endpoint got no request"
