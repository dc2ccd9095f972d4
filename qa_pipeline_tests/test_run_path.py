"""One run path: `qa-pipeline run` and a backfill from the UI give the same outputs, a run spans many
documents, a kill -9 in it resends at most the requests in flight, and a failing document fails alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from qa_pipeline.core.layout import DataLayout
from qa_pipeline.simulator.server import passage_key
from qa_pipeline.defs.checks import CHECKS
from qa_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, documents
from qa_pipeline.defs.sensors import LAUNCHED_BY_TAG
from qa_pipeline_tests.conftest import REPO, cli_env, run_cli, sql

# Short answers, never cut by max_tokens: the same prompt gets the same answer from either run path.
FAST = {"step_base_ms": 1, "step_per_seq_ms": 0.05, "output_tokens_mean": 30, "output_tokens_max": 200}
QA_PAIRS, CHUNKS = dg.AssetKey("qa_pairs"), dg.AssetKey("chunks")
BACKFILL_TAG = "dagster/backfill"
MARKER = "QUARANTINED"


def new_data_dir(root: Path) -> Path:
    """A data folder with an empty sources folder, and its DAGSTER_HOME next to it (as `cli_env` expects)."""
    (root / "data" / "sources").mkdir(parents=True)
    (root / "dagster_home").mkdir()
    return root / "data"


def write_documents(data_dir: Path, count: int, marked: int | None = None) -> dict[int, list[str]]:
    """Small Markdown documents of three sections each; the `marked` one has the marker in its second."""
    texts = {}
    for index in range(count):
        parts = [
            f"Document {index}, part {part}: the archive job keeps {part + index} copies for {index + 3} days."
            + (f" It is {MARKER} until the audit ends." if index == marked and part == 1 else "")
            for part in range(3)
        ]
        body = "\n\n".join(f"## Part {part}\n\n{text}" for part, text in enumerate(parts))
        (data_dir / "sources" / f"doc-{index}.md").write_text(f"# Document {index}\n\n{body}\n")
        texts[index] = parts
    return texts


def instance_of(env: dict[str, str]) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(env["DAGSTER_HOME"])


def materialized(instance: dg.DagsterInstance, asset: dg.AssetKey) -> set[str]:
    keys = instance.get_dynamic_partitions(documents.name)
    statuses = instance.get_status_by_partition(asset, keys, documents) or {}
    return {key for key, status in statuses.items() if status == dg.AssetPartitionStatus.MATERIALIZED}


def check_verdicts(instance: dg.DagsterInstance, runs: list[dg.DagsterRun]) -> dict[tuple[str, str], bool]:
    """(check, document) → passed, from the check evaluations the runs recorded (the latest wins)."""
    verdicts = {}
    for run in sorted(runs, key=lambda run: instance.get_run_record_by_id(run.run_id).create_timestamp):
        records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
        for record in records:
            evaluation = record.event_log_entry.dagster_event.event_specific_data
            verdicts[(evaluation.check_name, evaluation.partition)] = evaluation.passed
    return verdicts


def qa_pairs_runs(runs: list[dg.DagsterRun]) -> list[dg.DagsterRun]:
    return [run for run in runs if run.asset_selection and QA_PAIRS in run.asset_selection]


PAIRS_QUERY = "SELECT document, chunk_id, question, answer FROM qa_pairs ORDER BY document, chunk_id, pair_index"


def submit_ui_backfill(
    instance: dg.DagsterInstance,
    partitions: list[str],
    assets: tuple[dg.AssetKey, ...] = (CHUNKS, QA_PAIRS),
    run_config: dict | None = None,
) -> str:
    """An asset backfill of `assets` (`chunks` + `qa_pairs`) over `partitions`, the record the UI's dialog submits."""
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    from qa_pipeline.definitions import defs

    backfill_id = make_new_backfill_id()
    instance.add_backfill(
        PartitionBackfill.from_asset_partitions(
            backfill_id=backfill_id,
            asset_graph=defs().resolve_asset_graph(),
            partition_names=partitions,
            asset_selection=list(assets),
            backfill_timestamp=time.time(),
            tags={},
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=None,
            description=None,
            run_config=run_config,
        )
    )
    return backfill_id


def wait_for_backfill(
    instance: dg.DagsterInstance, backfill_id: str, partitions: list[str], daemon: subprocess.Popen, log: Path
) -> list[dg.DagsterRun]:
    """Until every partition of both assets is materialized and the backfill's runs have ended (the
    backfill record itself is closed on the daemon's next 30-second pass, which the user need not wait for)."""
    ended = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
    deadline = time.monotonic() + 150
    while True:
        assert daemon.poll() is None, f"dagster-daemon exited {daemon.returncode}: {log.read_text()[-3000:]}"
        runs = instance.get_runs(dg.RunsFilter(tags={BACKFILL_TAG: backfill_id}))
        failed = [run for run in runs if run.status in ended - {dg.DagsterRunStatus.SUCCESS}]
        assert not failed, f"backfill run {failed[0].run_id} ended {failed[0].status}"
        done = materialized(instance, CHUNKS) >= set(partitions) and materialized(instance, QA_PAIRS) >= set(partitions)
        if done and runs and all(run.status in ended for run in runs):
            return runs
        assert time.monotonic() < deadline, (
            f"backfill {backfill_id} unfinished: runs {[(r.run_id[:8], r.status) for r in runs]}; "
            f"daemon log: {log.read_text()[-3000:]}"
        )
        time.sleep(0.5)


def start_daemon(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """`dagster-daemon run` on the project's workspace, in its own session (see `stop`), logging to `log`."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
        env=env,
        cwd=cwd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    """Stops a process started in its own session, and what it started (code server, run workers)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_cli_run_and_a_ui_backfill_over_the_same_documents_give_the_same_partitions_outputs_and_checks(
    simulator, tmp_path
):
    sim = simulator(**FAST, zero_latency=True)
    cli_dir, ui_dir = new_data_dir(tmp_path / "cli"), new_data_dir(tmp_path / "ui")
    write_documents(cli_dir, 4)
    write_documents(ui_dir, 4)
    cli, ui = cli_env(cli_dir, sim.base_url), cli_env(ui_dir, sim.base_url)

    # A: the command line.
    run_cli("run", "--skip-benchmark", "--concurrency", "4", env=cli)

    # B: `dagster dev` on a persistent instance; the documents registered and chunked by the CLI, then
    # a backfill of chunks + qa_pairs over all of them as the UI submits it, run by the daemon.
    shutil.copy(REPO / "deploy" / "dagster-dev.yaml", Path(ui["DAGSTER_HOME"]) / "dagster.yaml")
    run_cli("run", "--chunks-only", env=ui)
    log = tmp_path / "daemon.log"
    with instance_of(ui) as instance:
        partitions = list(instance.get_dynamic_partitions(documents.name))
        assert len(partitions) == 4
        backfill_id = submit_ui_backfill(instance, partitions)
        daemon = start_daemon(ui, tmp_path, log)
        try:
            backfill_runs = wait_for_backfill(instance, backfill_id, partitions, daemon, log)
        finally:
            stop(daemon)
        ui_partitions = {asset: materialized(instance, asset) for asset in (CHUNKS, QA_PAIRS)}
        ui_checks = check_verdicts(instance, backfill_runs)
        ui_qa_runs = qa_pairs_runs(backfill_runs)
    with instance_of(cli) as instance:
        cli_partitions = {asset: materialized(instance, asset) for asset in (CHUNKS, QA_PAIRS)}
        cli_checks = check_verdicts(instance, list(instance.get_runs()))

    assert cli_partitions == ui_partitions == {CHUNKS: set(partitions), QA_PAIRS: set(partitions)}
    cli_pairs = sql(PAIRS_QUERY, cli)
    assert len(cli_pairs) >= 12
    assert sql(PAIRS_QUERY, ui) == cli_pairs, "the same QA pairs from either run path"
    assert len(cli_checks) == len(CHECKS) * 4, cli_checks
    assert ui_checks == cli_checks, "the same verdict per check and document"
    assert len(ui_qa_runs) == 1, f"the backfill ran qa_pairs as {len(ui_qa_runs)} runs, not one over all documents"
    (run,) = ui_qa_runs
    assert (run.tags.get(RANGE_START_TAG), run.tags.get(RANGE_END_TAG)) == (partitions[0], partitions[-1]), run.tags


def write_records(data_dir: Path, documents_count: int, records: int) -> dict[str, list[str]]:
    """Pre-chunked JSONL documents: each record is one chunk, every text distinct."""
    texts = {}
    for doc in range(documents_count):
        key = f"records-{doc:02d}.jsonl"
        texts[key] = [
            f"Record {i} of batch {doc}: the sync job copies {i * 3 + doc} files and checks {i % 9} checksums."
            for i in range(records)
        ]
        (data_dir / "sources" / key).write_text("".join(json.dumps({"content": t}) + "\n" for t in texts[key]))
    return texts


def journal_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_9_in_a_run_over_many_documents_resends_at_most_the_requests_in_flight(simulator, data_dir, tmp_path):
    concurrency = 16
    # Half a second per request: 300 chunks take about ten seconds at concurrency 16.
    sim = simulator(max_num_seqs=64, step_base_ms=5, step_per_seq_ms=0, output_tokens_mean=100, output_tokens_sigma=0)
    texts = write_records(data_dir, 10, 30)
    env = cli_env(data_dir, sim.base_url)
    layout = DataLayout(data_dir)
    run = ("run", "--skip-benchmark", "--concurrency", str(concurrency), "--max-tokens", "512")
    log = tmp_path / "killed.log"

    process = subprocess.Popen(
        [sys.executable, "-m", "qa_pipeline.cli", *run], env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            lines = {key: journal_lines(layout.journal_file(key)) for key in texts}
            if sum(lines.values()) >= 60 and sum(n > 0 for n in lines.values()) >= 3:
                break
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    saved = sum(journal_lines(layout.journal_file(key)) for key in texts)
    assert 60 <= saved < 300, log.read_text()[-3000:]

    rerun = run_cli(*run, env=env)
    assert "10 documents done, 0 failed" in rerun.stdout

    sent = sim.stats()["requests_by_passage"]
    per_chunk = [sent.get(passage_key(text), 0) for chunk_texts in texts.values() for text in chunk_texts]
    assert min(per_chunk) == 1 and max(per_chunk) <= 2, "every chunk was sent, none more than twice"
    sent_twice = sum(count == 2 for count in per_chunk)
    assert sent_twice <= concurrency, f"{sent_twice} chunks were sent again after the kill (concurrency {concurrency})"
    rows = sql(
        "SELECT count(DISTINCT (document, chunk_id)) AS chunks, "
        "count(*) - count(DISTINCT (document, chunk_id, pair_index)) AS duplicates FROM qa_pairs",
        env,
    )
    assert rows == [{"chunks": 300, "duplicates": 0}], "each chunk has exactly one set of pairs"


def test_a_document_over_its_threshold_fails_alone_in_a_run_over_many_documents_and_reruns_alone(simulator, data_dir):
    sim = simulator(**FAST, fail_if_contains=[MARKER])
    write_documents(data_dir, 4, marked=2)
    env = cli_env(data_dir, sim.base_url)
    run = ("run", "--skip-benchmark", "--concurrency", "4", "--max-tokens", "512")

    first = run_cli(*run, env=env, check=False)
    assert first.returncode == 1
    assert "3 documents done, 1 failed" in first.stdout
    console = first.stdout + first.stderr
    assert "STEP_FAILURE" in console and "1 of 4 documents failed (doc-2.md" in console
    assert "Stack Trace" not in console, "a document over its threshold is not a crash: no stack trace"
    with instance_of(env) as instance:
        runs = instance.get_runs(dg.RunsFilter(tags={LAUNCHED_BY_TAG: "cli"}))
        (qa_run,) = qa_pairs_runs(runs)
        assert f"Dagster runs: {', '.join(r.run_id[:8] for r in reversed(runs))} " in first.stdout
        assert (qa_run.tags[RANGE_START_TAG], qa_run.tags[RANGE_END_TAG]) == ("doc-0.md", "doc-3.md"), (
            "the four documents were one qa_pairs run"
        )
        assert materialized(instance, QA_PAIRS) == {"doc-0.md", "doc-1.md", "doc-3.md"}

    sim.set_faults()
    again = run_cli(*run, "--failed", env=env)
    assert "1 documents done, 0 failed" in again.stdout
    with instance_of(env) as instance:
        runs = instance.get_runs(dg.RunsFilter(tags={LAUNCHED_BY_TAG: "cli"}))
        rerun = qa_pairs_runs(runs)[0]  # the newest
        assert rerun.run_id != qa_run.run_id
        assert (rerun.tags[RANGE_START_TAG], rerun.tags[RANGE_END_TAG]) == ("doc-2.md", "doc-2.md")
        assert materialized(instance, QA_PAIRS) == {f"doc-{i}.md" for i in range(4)}


def test_a_run_spanning_unchanged_documents_leaves_their_files_as_they_were(simulator, data_dir):
    sim = simulator(**FAST)
    write_documents(data_dir, 3)
    env = cli_env(data_dir, sim.base_url)
    run = ("run", "--skip-benchmark", "--concurrency", "4", "--max-tokens", "512")
    run_cli(*run, env=env)
    layout = DataLayout(root=data_dir)
    tables = ("chunks", "qa_pairs", "failures", "pair_scores")
    written = {
        (table, key): layout.partition_file(table, key).stat().st_mtime_ns
        for table in tables
        for key in ("doc-0.md", "doc-1.md", "doc-2.md")
    }
    sent = sim.stats()["requests_total"]
    edited = data_dir / "sources" / "doc-1.md"
    edited.write_text(edited.read_text().replace("copies", "snapshots"))

    again = run_cli(*run, env=env)  # one run over the three documents: the range spans the unchanged ones

    assert "3 documents done, 0 failed" in again.stdout
    assert sim.stats()["requests_total"] - sent == 3, "only the edited document's three chunks were asked again"
    rewritten = {
        (table, key) for (table, key), mtime in written.items() if layout.partition_file(table, key).stat().st_mtime_ns != mtime
    }
    assert {key for _, key in rewritten} == {"doc-1.md"}, "no file of an unchanged document was rewritten"
    assert {("chunks", "doc-1.md"), ("qa_pairs", "doc-1.md"), ("pair_scores", "doc-1.md")} <= rewritten
    # The unchanged documents still have their check verdicts in the new run.
    assert again.stdout.count("success_rate: 3/3 documents passed") == 1
