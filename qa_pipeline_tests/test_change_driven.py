"""Change-driven regeneration on a real Dagster instance and a real folder: what changed, and only that, is redone."""

import os
import shutil
import subprocess
import sys

import dagster as dg
import pytest

from qa_pipeline.core.documents import compare_sources
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG
from qa_pipeline_tests.conftest import REPO, cli_env, sql

GENERATED = {"chunks", "qa_pairs"}


def section_document(title: str, first: str, second: str) -> str:
    """Two sections, so two chunks: a change to one section leaves the other chunk as it was."""
    return f"# {title}\n\n## Install\n\n{first * 20}\n\n## Configure\n\n{second * 20}\n"


ALPHA = section_document("Alpha", "Install alpha with pip and check its version. ", "Set ALPHA_HOME before the first run. ")
ALPHA_EDITED = section_document(
    "Alpha", "Install alpha with pip and check its version. ", "Alpha reads its settings from alpha.toml instead. "
)
BETA = section_document("Beta", "Beta ships as a single static binary. ", "Beta listens on port 9000 by default. ")
STABLE = section_document("Stable", "Stable never changes its install steps. ", "Stable has no configuration at all. ")


@pytest.fixture
def project(data_dir, monkeypatch):
    """The project's own definitions, pointed at a temporary data folder and a persistent temporary instance."""
    monkeypatch.setenv("QA_PIPELINE_DATA_DIR", str(data_dir))
    for name in ("QA_PIPELINE_SOURCES_DIR", "QA_PIPELINE_LLM_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    from qa_pipeline.definitions import defs

    with dg.DagsterInstance.local_temp(str(data_dir.parent / "dagster_home")) as instance:
        yield defs(), instance, DataLayout.from_env()


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    """Evaluates the sensor and applies its result the way the sensor daemon does."""
    sensor = defs.resolve_sensor_def("source_documents_sensor")
    # The daemon builds only the resources a sensor asks for (not the LLM client).
    storage = {"storage": defs.resources["storage"]}
    result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=storage))
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


def report_tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def("quality_report_sensor")
    return sensor(dg.build_sensor_context(instance=instance, cursor=cursor))


def requested(run_requests, instance: dg.DagsterInstance | None = None) -> dict[str | None, set[str]]:
    """Partition → assets of each run request (None for unpartitioned runs); a run over a range of
    documents counts for each of them."""
    found = {}
    for request in run_requests or []:
        assets = {key.to_user_string() for key in request.asset_selection}
        keys = [request.partition_key]
        if RANGE_START_TAG in request.tags:
            order = instance.get_dynamic_partitions("documents")
            keys = order[order.index(request.tags[RANGE_START_TAG]) : order.index(request.tags[RANGE_END_TAG]) + 1]
        found.update({key: assets for key in keys})
    return found


def execute(
    defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest, expect_success: bool = True
) -> dg.ExecuteInProcessResult:
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        run_config=request.run_config,
        asset_selection=request.asset_selection,
        partition_key=request.partition_key,
        instance=instance,
        tags={k: v for k, v in request.tags.items() if not k.startswith("dagster/") or k in (RANGE_START_TAG, RANGE_END_TAG)},
        raise_on_error=expect_success,
    )
    assert result.success == expect_success
    return result


def execute_all(defs, instance, result: dg.SensorResult) -> dict[str, dg.ExecuteInProcessResult]:
    return {r.partition_key or "": execute(defs, instance, r) for r in result.run_requests}


def partitions(instance: dg.DagsterInstance) -> set[str]:
    return set(instance.get_dynamic_partitions("documents"))


def qa_pairs_metadata(result: dg.ExecuteInProcessResult) -> dict:
    (materialization,) = result.asset_materializations_for_node("qa_pairs")
    return {name: value.value for name, value in materialization.metadata.items()}


def test_edits_to_the_folder_regenerate_exactly_the_documents_that_changed(project, simulator, data_dir, monkeypatch):
    sim = simulator(max_num_seqs=32, step_base_ms=2, output_tokens_mean=120, output_tokens_max=600)
    monkeypatch.setenv("QA_PIPELINE_LLM_BASE_URL", sim.base_url)
    _, instance, layout = project
    from qa_pipeline.definitions import defs as load_definitions

    defs = load_definitions()  # the endpoint is read when the code location loads
    sources = layout.sources_dir
    (sources / "stable.md").write_text(STABLE)

    # First look at the folder: its one document gets a partition and a run.
    first = tick(defs, instance, cursor=None)
    assert requested(first.run_requests, instance) == {"stable.md": GENERATED}
    assert partitions(instance) == {"stable.md"}
    execute_all(defs, instance, first)

    # Two documents added: exactly those two, nothing for the one left alone.
    (sources / "alpha.md").write_text(ALPHA)
    (sources / "beta.md").write_text(BETA)
    added = tick(defs, instance, first.cursor)
    assert requested(added.run_requests, instance) == {"alpha.md": GENERATED, "beta.md": GENERATED}
    assert all(r.tags["qa_pipeline/launched_by"] == "source_change" for r in added.run_requests)
    assert partitions(instance) == {"stable.md", "alpha.md", "beta.md"}
    execute_all(defs, instance, added)

    # The report follows once the new qa_pairs have landed, and then stays put.
    report = report_tick(defs, instance, cursor=None)
    assert requested(report.run_requests, instance) == {None: {"quality_report"}}
    execute_all(defs, instance, report)
    report = report_tick(defs, instance, report.cursor)
    assert report.run_requests == []

    # One section of one document changed: only its partition runs, and only the changed chunk costs a request.
    (sources / "alpha.md").write_text(ALPHA_EDITED)
    changed = tick(defs, instance, added.cursor)
    assert requested(changed.run_requests, instance) == {"alpha.md": GENERATED}
    assert not changed.dynamic_partitions_requests
    regenerated = qa_pairs_metadata(execute_all(defs, instance, changed)["alpha.md"])
    assert (regenerated["chunks"], regenerated["requests_sent"], regenerated["chunks_from_cache"]) == (2, 1, 1)

    report = report_tick(defs, instance, report.cursor)
    assert requested(report.run_requests, instance) == {None: {"quality_report"}}
    execute_all(defs, instance, report)

    # Touching a file (new mtime, same bytes) triggers nothing.
    stable = sources / "stable.md"
    os.utime(stable, (stable.stat().st_atime + 3600, stable.stat().st_mtime + 3600))
    touched = tick(defs, instance, changed.cursor)
    assert touched.run_requests == [] and not touched.dynamic_partitions_requests and touched.skip_reason
    assert touched.cursor == changed.cursor

    # A deleted document loses its partition and its outputs at once; the report is refreshed.
    (sources / "beta.md").unlink()
    deleted = tick(defs, instance, touched.cursor)
    assert deleted.run_requests == []
    assert partitions(instance) == {"stable.md", "alpha.md"}
    assert not layout.partition_file("qa_pairs", "beta.md").exists()
    assert not layout.journal_file("beta.md").exists()
    report = report_tick(defs, instance, report.cursor)
    assert requested(report.run_requests, instance) == {None: {"quality_report"}}
    execute_all(defs, instance, report)

    # A rename is a deletion plus an addition.
    stable.rename(sources / "renamed.md")
    renamed = tick(defs, instance, deleted.cursor)
    assert requested(renamed.run_requests, instance) == {"renamed.md": GENERATED}
    assert partitions(instance) == {"alpha.md", "renamed.md"}
    execute_all(defs, instance, renamed)
    report = report_tick(defs, instance, report.cursor)
    execute_all(defs, instance, report)
    assert report_tick(defs, instance, report.cursor).run_requests == []

    # Nothing left to do, and a lost cursor does not regenerate everything: the instance remembers.
    assert tick(defs, instance, renamed.cursor).run_requests == []
    assert tick(defs, instance, cursor=None).run_requests == []

    env = cli_env(data_dir)
    for table in ("chunks", "qa_pairs"):
        rows = sql(f"SELECT DISTINCT document FROM {table} ORDER BY 1", env)
        assert [row["document"] for row in rows] == ["alpha.md", "renamed.md"], table
    alpha = " ".join(row["content"] for row in sql("SELECT content FROM chunks WHERE document = 'alpha.md'", env))
    assert "alpha.toml" in alpha and "ALPHA_HOME" not in alpha
    orphans = sql(
        "SELECT count(*) AS n FROM qa_pairs q WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.chunk_id = q.chunk_id)",
        env,
    )
    assert orphans == [{"n": 0}]


def events_by_partition(result: dg.ExecuteInProcessResult, event_type: dg.DagsterEventType) -> dict[str, int]:
    """Partition → how many events of `event_type` the run recorded for `qa_pairs` (materializations or checks)."""
    counts: dict[str, int] = {}
    for event in result.all_events:
        if event.event_type != event_type:
            continue
        data = event.event_specific_data
        key = data.materialization.asset_key if event_type == dg.DagsterEventType.ASSET_MATERIALIZATION else data.asset_key
        partition = data.materialization.partition if event_type == dg.DagsterEventType.ASSET_MATERIALIZATION else data.partition
        if key == dg.AssetKey("qa_pairs"):
            counts[partition] = counts.get(partition, 0) + 1
    return counts


def test_a_sensor_run_spanning_unchanged_documents_records_only_the_changed_ones(project, simulator, monkeypatch):
    sim = simulator(max_num_seqs=32, step_base_ms=2, output_tokens_mean=120, output_tokens_max=600)
    monkeypatch.setenv("QA_PIPELINE_LLM_BASE_URL", sim.base_url)
    _, instance, layout = project
    from qa_pipeline.definitions import defs as load_definitions

    defs = load_definitions()
    sources = layout.sources_dir
    for name, text in (("a.md", ALPHA), ("b.md", STABLE), ("c.md", BETA)):
        (sources / name).write_text(text)
    first = tick(defs, instance, cursor=None)
    execute_all(defs, instance, first)
    b_before = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("qa_pairs"), asset_partitions=["b.md"]), limit=1
    ).records[0]

    # The first and the last document change: one run over the range a..c, which spans b.
    (sources / "a.md").write_text(ALPHA_EDITED)
    (sources / "c.md").write_text(BETA.replace("port 9000", "port 9100"))
    changed = tick(defs, instance, first.cursor)
    assert requested(changed.run_requests, instance) == {key: GENERATED for key in ("a.md", "b.md", "c.md")}
    (request,) = changed.run_requests
    assert request.run_config["ops"]["qa_pairs"]["config"]["span_only_documents"] == ["b.md"]
    sent = sim.stats()["requests_total"]
    result = execute(defs, instance, request)

    assert sim.stats()["requests_total"] - sent == 2, "one changed chunk in a.md and one in c.md"
    materialized = events_by_partition(result, dg.DagsterEventType.ASSET_MATERIALIZATION)
    assert materialized == {"a.md": 1, "c.md": 1}, "the spanned, unchanged b.md is not recorded again"
    checked = events_by_partition(result, dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    assert set(checked) == {"a.md", "c.md"} and all(count > 0 for count in checked.values())
    b_after = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("qa_pairs"), asset_partitions=["b.md"]), limit=1
    ).records[0]
    assert b_after.storage_id == b_before.storage_id, "b.md's last materialization stands"
    statuses = instance.get_status_by_partition(dg.AssetKey("qa_pairs"), ["a.md", "b.md", "c.md"], defs.get_assets_def("qa_pairs").partitions_def)
    assert set(statuses.values()) == {dg.AssetPartitionStatus.MATERIALIZED}

    # b.md changes next: now it is asked for, and recorded.
    (sources / "b.md").write_text(STABLE.replace("no configuration", "one setting"))
    again = execute_all(defs, instance, tick(defs, instance, changed.cursor))
    assert events_by_partition(again["b.md"], dg.DagsterEventType.ASSET_MATERIALIZATION) == {"b.md": 1}


def test_a_spanned_document_is_not_the_runs_work_even_when_its_chunks_failed_before(project, simulator, monkeypatch):
    """A run over a range to regenerate its first and last documents sends only their changed chunks: a
    document between them is not read, retried or published (it fails on until it is re-run or edited),
    as it would not be if each changed document had a run of its own."""
    sim = simulator(max_num_seqs=32, step_base_ms=2, output_tokens_mean=120, output_tokens_max=600, fail_if_contains=["Stable"])
    monkeypatch.setenv("QA_PIPELINE_LLM_BASE_URL", sim.base_url)
    _, instance, layout = project
    from qa_pipeline.definitions import defs as load_definitions

    defs = load_definitions()
    sources = layout.sources_dir
    for name, text in (("a.md", ALPHA), ("b.md", STABLE), ("c.md", BETA)):
        (sources / name).write_text(text)
    first = tick(defs, instance, cursor=None)
    (request,) = first.run_requests
    execute(defs, instance, request, expect_success=False)  # b.md's chunks all fail
    b_journal = layout.journal_file("b.md").read_bytes()
    sim.set_faults()  # the server would now answer b.md

    (sources / "a.md").write_text(ALPHA_EDITED)
    (sources / "c.md").write_text(BETA.replace("port 9000", "port 9100"))
    changed = tick(defs, instance, first.cursor)
    (request,) = changed.run_requests
    assert request.run_config["ops"]["qa_pairs"]["config"]["span_only_documents"] == ["b.md"]
    sent = sim.stats()["requests_total"]
    result = execute(defs, instance, request)

    assert sim.stats()["requests_total"] - sent == 2, "one changed chunk in a.md and one in c.md; none of b.md"
    assert layout.journal_file("b.md").read_bytes() == b_journal
    assert events_by_partition(result, dg.DagsterEventType.ASSET_MATERIALIZATION) == {"a.md": 1, "c.md": 1}
    b_records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("qa_pairs"), asset_partitions=["b.md"]), limit=1
    ).records
    assert b_records == [], "b.md is still not materialized: it waits for its own re-run"


def test_edits_far_apart_take_a_run_each_instead_of_one_run_spanning_every_document_between(project):
    """A run's range spans the unchanged documents between two edited ones only while that is cheaper
    than a run of its own: Dagster records a `chunks` materialization for each partition of a range,
    so two edits thousands of documents apart must not make a run record thousands."""
    from qa_pipeline.core.run_ranges import MAX_SPANNED_GAP

    defs, instance, layout = project
    keys = [f"page-{index:04d}.md" for index in range(MAX_SPANNED_GAP + 4)]
    for key in keys:
        (layout.sources_dir / key).write_text(f"# {key}\n\nThe page called {key}.\n")
    first = tick(defs, instance, cursor=None)
    assert partitions(instance) == set(keys)
    order = instance.get_dynamic_partitions("documents")

    def edit(*edited: str) -> list[dict]:
        for key in edited:
            (layout.sources_dir / key).write_text(f"# {key}\n\nThe page called {key}, edited.\n")
        result = tick(defs, instance, first.cursor)
        for key in edited:  # as they were, for the next case
            (layout.sources_dir / key).write_text(f"# {key}\n\nThe page called {key}.\n")
        return [
            {
                "keys": list(requested([request], instance)),
                "spanned": request.run_config.get("ops", {}).get("chunks", {}).get("config", {}).get("span_only_documents", []),
            }
            for request in result.run_requests
        ]

    # MAX_SPANNED_GAP unchanged documents between two edits: one run spans them.
    near = edit(order[0], order[MAX_SPANNED_GAP + 1])
    assert [run["keys"] for run in near] == [order[: MAX_SPANNED_GAP + 2]]
    assert near[0]["spanned"] == order[1 : MAX_SPANNED_GAP + 1]
    # One more: two runs of one document each, spanning nothing.
    far = edit(order[0], order[MAX_SPANNED_GAP + 2])
    assert [run["keys"] for run in far] == [[order[0]], [order[MAX_SPANNED_GAP + 2]]]
    assert [run["spanned"] for run in far] == [[], []]


def test_a_run_cut_by_the_documents_per_run_limit_starts_and_ends_with_a_changed_document():
    from qa_pipeline.core.run_ranges import partition_ranges

    order = [f"d{index}" for index in range(8)]
    # d0 and d5 changed, the four between spanned; two documents a run: no run of spanned documents alone.
    assert partition_ranges(["d0", "d5"], order, per_run=2, max_gap=4) == [["d0"], ["d5"]]
    assert partition_ranges(["d0", "d1", "d3"], order, per_run=3, max_gap=4) == [["d0", "d1"], ["d3"]]
    assert partition_ranges(["d0", "d5"], order, per_run=None, max_gap=4) == [order[:6]]


def test_the_schedule_catches_changes_the_sensor_did_not_see_and_repeats_none_it_did(project, data_dir):
    defs, instance, layout = project
    schedule = defs.resolve_schedule_def("source_documents_schedule")
    sources = layout.sources_dir
    (sources / "alpha.md").write_text(ALPHA)
    (sources / "beta.md").write_text(BETA)

    def run_schedule():
        context = dg.build_schedule_context(
            instance=instance, resources={"storage": defs.resources["storage"]}, repository_def=defs.get_repository_def()
        )
        with dg.partition_loading_context(dynamic_partitions_store=instance):
            return schedule.evaluate_tick(context)

    tick(defs, instance, cursor=None)
    assert run_schedule().run_requests == []  # what the sensor requested is recorded in the instance

    # The sensor is stopped; the schedule alone sees an edit and a deletion.
    (sources / "alpha.md").write_text(ALPHA_EDITED)
    layout.partition_file("qa_pairs", "beta.md").parent.mkdir(parents=True)
    layout.partition_file("qa_pairs", "beta.md").write_bytes(b"stale")
    (sources / "beta.md").unlink()
    data = run_schedule()
    assert requested(data.run_requests, instance) == {"alpha.md": GENERATED}
    assert partitions(instance) == {"alpha.md"}
    assert not layout.partition_file("qa_pairs", "beta.md").exists()
    assert run_schedule().run_requests == []


def test_an_emptied_sources_folder_deletes_nothing_unattended(project):
    defs, instance, layout = project
    (layout.sources_dir / "alpha.md").write_text(ALPHA)
    first = tick(defs, instance, cursor=None)
    (layout.sources_dir / "alpha.md").unlink()
    emptied = tick(defs, instance, first.cursor)
    assert emptied.run_requests == [] and "is empty" in emptied.skip_reason.skip_message
    assert partitions(instance) == {"alpha.md"}


def test_a_rename_is_a_deletion_plus_an_addition_and_same_content_is_no_change():
    changes = compare_sources(
        {"renamed.md": "h1", "kept.md": "h2", "edited.md": "h4"},
        partitions=["old.md", "kept.md", "edited.md"],
        known_hashes={"old.md": "h1", "kept.md": "h2", "edited.md": "h3"},
    )
    assert (changes.added, changes.changed, changes.removed) == (("renamed.md",), ("edited.md",), ("old.md",))
    assert changes.to_generate == ("edited.md", "renamed.md")


def test_the_report_waits_while_a_run_writing_qa_pairs_is_pending(project):
    defs, instance, layout = project
    (layout.sources_dir / "alpha.md").write_text(ALPHA)
    tick(defs, instance, cursor=None)
    instance.report_runless_asset_event(dg.AssetMaterialization("qa_pairs", partition="alpha.md"))
    queued = instance.create_run_for_job(
        defs.resolve_implicit_global_asset_job_def(),
        asset_selection={dg.AssetKey("chunks"), dg.AssetKey("qa_pairs")},
        tags={"dagster/partition": "alpha.md"},
        status=dg.DagsterRunStatus.NOT_STARTED,
    )
    waiting = report_tick(defs, instance, cursor=None)
    assert waiting.run_requests == [] and "waiting" in waiting.skip_reason.skip_message
    instance.report_run_canceled(queued)
    assert requested(report_tick(defs, instance, waiting.cursor).run_requests) == {None: {"quality_report"}}


def test_change_detection_is_on_by_default_and_configured_from_the_environment(tmp_path):
    """`dagster dev` starts the sensors and the schedule RUNNING; cron and model come from the environment."""
    probe = (
        "from qa_pipeline.definitions import defs\n"
        "d = defs()\n"
        "for s in [*d.sensors, *d.schedules]: print(s.name, s.default_status.value)\n"
        "print('cron', d.get_schedule_def('source_documents_schedule').cron_schedule)\n"
        "print('code_version', d.get_assets_def('qa_pairs').code_versions_by_key[d.get_assets_def('qa_pairs').key])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QA_PIPELINE_")}
    env.update(QA_PIPELINE_SOURCES_CRON="*/15 * * * *", QA_PIPELINE_LLM_MODEL="meta-llama/Llama-3.1-8B-Instruct")
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert {
        "source_documents_sensor RUNNING",
        "quality_report_sensor RUNNING",
        "source_documents_schedule RUNNING",
        "cron */15 * * * *",
    } <= set(out)
    from qa_pipeline.core.prompts import PROMPT_VERSION

    assert f"code_version {PROMPT_VERSION}+meta-llama/Llama-3.1-8B-Instruct" in out

    # The instance example the docs point to loads and sets the limits they describe.
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster-dev.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1
        limits = concurrency.run_queue_config.tag_concurrency_limits
        assert {"key": "qa_pipeline/launched_by", "value": "source_change", "limit": 2} in limits
