"""The model is a dimension of the dataset: two named models on the same chunks keep their own outputs,
cache and benchmark, `qa-pipeline compare` ranks them as their profiles say, a name the server does not
serve fails before any request, and a UI backfill over the model dimension runs under dagster-daemon."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from qa_pipeline.core.layout import DataLayout, Table
from qa_pipeline.core.settings import SettingsError, load_models
from qa_pipeline.core.storage import Storage
from qa_pipeline.defs.partitions import documents, documents_by_model, model_partition_key, models
from qa_pipeline_tests.conftest import REPO, cli_env, run_cli, sql
from qa_pipeline_tests.test_run_path import (
    BACKFILL_TAG,
    instance_of,
    new_data_dir,
    start_daemon,
    stop,
    submit_ui_backfill,
    write_documents,
)
from qa_pipeline_tests.written_outputs import write_document

# "fast" is served by the simulator's default engine; "slow" has a profile of its own: slower decode
# steps, malformed answers (a chunk fails when its retry is malformed too) and answers made up from text not in the chunk.
SERVER = {"step_base_ms": 2, "step_per_seq_ms": 0.05, "output_tokens_mean": 40, "output_tokens_max": 200}
SLOW_PROFILE = {"step_base_ms": 12, "fault_rate": 0.7, "fault_kinds": ["malformed"], "ungrounded_rate": 0.6}
QA_PAIRS_BY_MODEL = dg.AssetKey("qa_pairs_by_model")


def start_two_models(simulator):
    return simulator(**SERVER, served_model_name=["fast"], model_profiles={"slow": SLOW_PROFILE})


def write_models_file(data_dir: Path, base_url: str, slow_served_as: str = "slow") -> None:
    (data_dir / "models.toml").write_text(
        f'[models.fast]\nbase_url = "{base_url}"\n\n'
        f'[models.slow]\nbase_url = "{base_url}"\nserved_name = "{slow_served_as}"\n'
    )


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_two_models_on_the_same_chunks_keep_their_own_outputs_and_compare_in_the_order_of_their_profiles(
    simulator, data_dir
):
    sim = start_two_models(simulator)
    write_documents(data_dir, 4)
    write_models_file(data_dir, sim.openai_base_url)
    env = cli_env(data_dir)
    layout = DataLayout(root=data_dir)
    benchmark = ("--levels", "1,4", "--sample-size", "6")

    fast = run_cli("run", "--model", "fast", *benchmark, env=env)
    assert "4 documents done, 0 failed" in fast.stdout, fast.stdout
    fast_outputs = file_digests(layout.for_model("fast").outputs_dir / "models" / "fast")
    fast_journals = file_digests(layout.for_model("fast").journal_file("x").parent)
    assert any(name.startswith("qa_pairs/") for name in fast_outputs) and fast_journals

    # The slow model fails some chunks (its documents go over the failure threshold): that is its figure.
    run_cli("run", "--model", "slow", *benchmark, env=env, check=False)
    assert file_digests(layout.outputs_dir / "models" / "fast") == fast_outputs, "the second model replaced the first's files"
    assert file_digests(layout.for_model("fast").journal_file("x").parent) == fast_journals, "the first model's cache changed"
    assert sql("SELECT count(*) AS n FROM qa_pairs", env)[0]["n"] == 0, "the default generator's table stays empty"

    # Going back to the first model costs nothing: every answer is in its journal.
    sent = sim.stats()["requests_total"]
    again = run_cli("run", "--model", "fast", "--skip-benchmark", env=env)
    assert "4 documents done, 0 failed" in again.stdout
    assert sim.stats()["requests_total"] == sent, "running the first model again sent requests"

    compare = run_cli("compare", env=env)
    assert "fast" in compare.stdout and "slow" in compare.stdout
    assert "each model's pairs side by side" in compare.stdout
    rows = {row["model"]: row for row in sql("SELECT * FROM model_comparison", env)}
    assert set(rows) == {"fast", "slow"}
    fast_row, slow_row = rows["fast"], rows["slow"]
    assert fast_row["chunks"] == slow_row["chunks"] >= 12, "compared on the same chunks"
    assert fast_row["served_model"] == "fast" and slow_row["served_model"] == "slow"
    assert fast_row["success_rate"] == 1.0 > slow_row["success_rate"]
    assert slow_row["failures_by_reason"], "the slow model's failures are named by reason"
    assert fast_row["output_tokens_per_s"] > slow_row["output_tokens_per_s"]
    assert fast_row["chunks_per_s"] > slow_row["chunks_per_s"]
    assert fast_row["latency_p50_s"] < slow_row["latency_p50_s"]
    assert fast_row["latency_p95_s"] < slow_row["latency_p95_s"]
    assert fast_row["groundedness_mean"] > slow_row["groundedness_mean"]
    assert fast_row["groundedness_p10"] >= slow_row["groundedness_p10"]
    assert fast_row["accepted_pairs"] > slow_row["accepted_pairs"]
    assert fast_row["tokens_per_accepted_pair"] < slow_row["tokens_per_accepted_pair"]
    assert fast_row["server_s_per_1000_accepted"] < slow_row["server_s_per_1000_accepted"]
    # Each model's recommendation is its own, measured on its own name and endpoint.
    for name in ("fast", "slow"):
        models_benchmarked = sql(f"SELECT DISTINCT model FROM read_parquet('{layout.outputs_dir}/models/{name}/benchmark_runs/*.parquet')", env)
        assert models_benchmarked == [{"model": name}]


def test_models_run_at_a_set_concurrency_without_a_benchmark_compare_at_the_pace_of_their_own_requests(
    simulator, data_dir
):
    sim = start_two_models(simulator)
    write_documents(data_dir, 2)
    write_models_file(data_dir, sim.openai_base_url)
    env = cli_env(data_dir)
    for name in ("fast", "slow"):
        run_cli("run", "--model", name, "--concurrency", "4", env=env, check=False)
    assert not list((data_dir / "outputs" / "models").glob("*/benchmark_runs/*.parquet")), "no benchmark ran"

    rows = {row["model"]: row for row in sql("SELECT * FROM model_comparison", env)}

    assert rows["fast"]["recommended_concurrency"] is None and rows["slow"]["recommended_concurrency"] is None
    assert rows["fast"]["output_tokens_per_s"] > rows["slow"]["output_tokens_per_s"] > 0
    assert rows["fast"]["chunks_per_s"] > rows["slow"]["chunks_per_s"] > 0
    assert rows["fast"]["server_s_per_1000_accepted"] < rows["slow"]["server_s_per_1000_accepted"]


def test_a_named_model_on_its_own_server_is_benchmarked_at_the_default_levels_when_the_default_is_embedded(
    simulator, data_dir
):
    # No QA_PIPELINE_LLM_BASE_URL: the default generator would be the embedded CPU model, whose short sweep
    # (levels 1, 4, 8) must not be applied to a model served elsewhere.
    sim = start_two_models(simulator)
    write_documents(data_dir, 2)
    write_models_file(data_dir, sim.openai_base_url)
    env = cli_env(data_dir)
    run_cli("run", "--model", "fast", "--sample-size", "6", env=env)
    layout = DataLayout(root=data_dir)
    levels = sql(
        f"SELECT DISTINCT concurrency FROM read_parquet('{layout.outputs_dir}/models/fast/benchmark_runs/*.parquet') ORDER BY 1", env
    )
    assert [row["concurrency"] for row in levels] == [1, 4, 8, 16, 32, 64]


def test_a_model_name_the_server_does_not_serve_fails_before_any_request_naming_the_endpoint_and_served_names(
    simulator, data_dir
):
    sim = start_two_models(simulator)
    write_documents(data_dir, 2)
    write_models_file(data_dir, sim.openai_base_url, slow_served_as="Qwen3-4B")
    env = cli_env(data_dir)

    started = time.monotonic()
    run = run_cli("run", "--model", "slow", "--skip-benchmark", env=env, check=False)
    elapsed = time.monotonic() - started
    assert run.returncode == 1, run.stdout + run.stderr
    assert "'Qwen3-4B' is not served by " + sim.openai_base_url in run.stderr, run.stderr
    assert "it serves: fast, slow" in run.stderr and "No request was sent" in run.stderr
    assert "served_name of [models.slow]" in run.stderr, "the message says which setting to change"
    assert sim.stats()["requests_total"] == 0
    print(f"wrong served name reported after {elapsed:.1f} s (chunking two documents included)")

    unknown = run_cli("run", "--model", "llama", env=env, check=False)
    assert unknown.returncode == 2
    assert "no model named 'llama'" in unknown.stderr and "it names: fast, slow" in unknown.stderr
    assert str(data_dir / "models.toml") in unknown.stderr


def test_a_ui_backfill_over_the_model_dimension_materializes_each_document_for_each_model(simulator, tmp_path):
    sim = start_two_models(simulator)
    data_dir = new_data_dir(tmp_path)
    write_documents(data_dir, 3)
    write_models_file(data_dir, sim.openai_base_url)
    env = cli_env(data_dir)
    shutil.copy(REPO / "deploy" / "dagster-dev.yaml", Path(env["DAGSTER_HOME"]) / "dagster.yaml")
    run_cli("run", "--chunks-only", env=env)

    log = tmp_path / "daemon.log"
    with instance_of(env) as instance:
        # Adding a model is adding a key to the `models` dimension (the UI's "Add partition").
        instance.add_dynamic_partitions(models.name, ["fast", "slow"])
        docs = list(instance.get_dynamic_partitions(documents.name))
        keys = [model_partition_key(document, model) for model in ("fast", "slow") for document in docs]
        config = {"ops": {"qa_pairs_by_model": {"config": {"failure_threshold": 1.0, "concurrency": 4}}}}
        backfill_id = submit_ui_backfill(instance, keys, (QA_PAIRS_BY_MODEL,), config)
        daemon = start_daemon(env, tmp_path, log)
        ended = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
        deadline = time.monotonic() + 180
        try:
            while True:
                assert daemon.poll() is None, f"dagster-daemon exited: {log.read_text()[-3000:]}"
                runs = instance.get_runs(dg.RunsFilter(tags={BACKFILL_TAG: backfill_id}))
                statuses = instance.get_status_by_partition(QA_PAIRS_BY_MODEL, keys, documents_by_model) or {}
                settled = {k for k, s in statuses.items() if s is not None and s != dg.AssetPartitionStatus.IN_PROGRESS}
                if runs and all(run.status in ended for run in runs) and settled == set(keys):
                    break
                assert time.monotonic() < deadline, f"backfill unfinished: {statuses}; {log.read_text()[-3000:]}"
                time.sleep(0.5)
        finally:
            stop(daemon)
        checks = {
            (record.event_log_entry.dagster_event.event_specific_data.check_name,
             record.event_log_entry.dagster_event.event_specific_data.partition)
            for run in runs
            for record in instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
            ).records
        }

    # The fast model passes everything; the slow one has blocking check failures, but its pairs are saved.
    fast_keys = [key for key in keys if key.endswith("|fast")]
    assert all(statuses[key] == dg.AssetPartitionStatus.MATERIALIZED for key in fast_keys), statuses
    assert {partition for _, partition in checks} == set(keys), "one set of check verdicts per document and model"
    layout = DataLayout(root=data_dir)
    for model in ("fast", "slow"):
        assert len(list((layout.outputs_dir / "models" / model / "qa_pairs").glob("*.parquet"))) == 3
    compare = run_cli("compare", env=env)
    assert {row["model"] for row in sql("SELECT model FROM model_comparison", env)} == {"fast", "slow"}
    assert "each model's pairs side by side" in compare.stdout


def test_an_offline_model_runs_its_batch_command_keeps_its_answers_and_compares_with_the_served_one(
    simulator, data_dir
):
    sim = start_two_models(simulator)
    write_documents(data_dir, 3)
    # The same served name twice: once through the server, once offline through a `vllm run-batch`
    # stand-in (the simulator's batch mode, same command-line form), three requests a file.
    batch_command = f"{sys.executable} -m qa_pipeline.simulator batch --step-base-ms 2 --output-tokens-mean 40"
    (data_dir / "models.toml").write_text(
        f'[models.served]\nbase_url = "{sim.openai_base_url}"\nserved_name = "fast"\n\n'
        f'[models.offline]\nengine = "offline"\nserved_name = "fast"\nbatch_command = "{batch_command}"\n'
        "requests_per_file = 3\n"
    )
    env = cli_env(data_dir)
    layout = DataLayout(root=data_dir).for_model("offline")

    offline = run_cli("run", "--model", "offline", env=env)
    assert "3 documents done, 0 failed" in offline.stdout, offline.stdout
    assert "requests answered into" in offline.stdout + offline.stderr, "the batch command's log is streamed"
    assert sim.stats()["requests_total"] == 0, "the offline model sent nothing to the server"
    batch_files = sorted((layout.exports_dir / "offline" / "offline").rglob("batch-*.jsonl"))
    chunks = sql("SELECT count(*) AS n FROM chunks", env)[0]["n"]
    assert len(batch_files) == -(-chunks // 3), "one batch file per three requests"

    # A re-run sends only what is missing: here one document whose journal was lost.
    lost = layout.journal_file("doc-1.md")
    lost_lines = lost.read_text().count("\n")
    lost.unlink()
    again = run_cli("run", "--model", "offline", env=env)
    assert f"{lost_lines} requests to run, {chunks - lost_lines} already in the journal" in again.stdout + again.stderr

    run_cli("run", "--model", "served", "--levels", "1,4", "--sample-size", "6", env=env)
    run_cli("compare", env=env)
    rows = {row["model"]: row for row in sql("SELECT * FROM model_comparison", env)}
    assert set(rows) == {"served", "offline"}
    assert rows["served"]["chunks"] == rows["offline"]["chunks"] == chunks
    assert rows["offline"]["success_rate"] == rows["served"]["success_rate"] == 1.0
    assert rows["offline"]["output_tokens_per_s"] > 0 and rows["served"]["output_tokens_per_s"] > 0


def test_a_models_file_with_a_bad_entry_is_refused_naming_the_file_the_model_and_the_field(tmp_path):
    (tmp_path / "models.toml").write_text('[models."qwen|4b"]\nbase_url = "http://gpu:8000/v1"\n')
    with pytest.raises(SettingsError, match=r"model 'qwen\|4b' in .*models.toml: name: string should match"):
        load_models(tmp_path)
    (tmp_path / "models.toml").write_text('[models.qwen]\nbase_url = "http://gpu:8000/v1"\ntemprature = 0.2\n')
    with pytest.raises(SettingsError, match=r"model 'qwen' in .*models.toml: temprature: extra inputs are not permitted"):
        load_models(tmp_path)
    (tmp_path / "models.toml").write_text('[models.qwen]\nbase_url = "http://gpu:8000/v1"\nengine = "offline"\n')
    assert load_models(tmp_path)["qwen"].batch_command == "vllm run-batch"


def test_deleting_a_document_moves_every_models_outputs_compacted_or_not_and_moving_them_back_restores_them(
    tmp_path,
):
    layout = DataLayout(root=tmp_path / "data")
    for model in (None, "fast"):
        for n in range(3):
            write_document(
                Storage(layout.for_model(model)),
                f"guide/page-{n}.md",
                {f"c{n}": f"Page {n} explains the backup."},
                {f"c{n}": [(f"What does page {n} explain ({model})?", "The backup.", "factual")]},
            )
    compacted = [c.table for c in Storage(layout).compact()]
    assert compacted.count(Table.QA_PAIRS) == 2, "the default generator's qa_pairs and the named model's"

    def pairs(model):
        return Storage(layout.for_model(model)).query("SELECT document FROM qa_pairs ORDER BY document")["document"]

    before = {model: pairs(model).to_list() for model in (None, "fast")}
    trash = Storage(layout).delete_partition("guide/page-1.md")

    for model in (None, "fast"):
        assert "guide/page-1.md" not in pairs(model).to_list(), model
        assert Storage(layout.for_model(model)).read_partition(Table.QA_PAIRS, "guide/page-1.md") is None
    shutil.copytree(trash, layout.root, dirs_exist_ok=True)
    assert {model: pairs(model).to_list() for model in (None, "fast")} == before


def test_a_models_prompt_version_words_its_requests_keys_its_cache_and_shows_in_the_comparison(simulator, data_dir):
    sim = start_two_models(simulator)
    write_documents(data_dir, 2)
    # The same served model twice: only the prompt version differs.
    (data_dir / "models.toml").write_text(
        f'[models.current]\nbase_url = "{sim.openai_base_url}"\nserved_name = "fast"\n\n'
        f'[models.brief]\nbase_url = "{sim.openai_base_url}"\nserved_name = "fast"\nprompt_version = "qa-v2-brief"\n'
    )
    env = cli_env(data_dir)
    layout = DataLayout(root=data_dir)
    run_cli("run", "--model", "current", "--skip-benchmark", env=env)
    sent = sim.stats()["requests_total"]
    brief = run_cli("run", "--model", "brief", "--skip-benchmark", env=env)
    assert "2 documents done, 0 failed" in brief.stdout, brief.stdout
    chunks = sql("SELECT count(*) AS n FROM chunks", env)[0]["n"]
    assert sim.stats()["requests_total"] - sent >= chunks, "the other prompt version found nothing in a cache"

    def pairs(model: str) -> list[dict]:
        files = f"{layout.outputs_dir}/models/{model}/qa_pairs/*.parquet"
        return sql(
            f"SELECT list(DISTINCT prompt_version) AS versions, list(DISTINCT request_hash) AS keys, "
            f"avg(prompt_tokens) AS prompt_tokens FROM read_parquet('{files}')",
            env,
        )[0]

    current, terse = pairs("current"), pairs("brief")
    assert current["versions"] == ["qa-v2"] and terse["versions"] == ["qa-v2-brief"]
    assert not set(current["keys"]) & set(terse["keys"]), "the prompt version is part of the cache key"
    assert terse["prompt_tokens"] < current["prompt_tokens"], "the brief prompt is the shorter request"

    run_cli("compare", env=env)
    rows = {row["model"]: row["prompt_version"] for row in sql("SELECT model, prompt_version FROM model_comparison", env)}
    assert rows == {"current": "qa-v2", "brief": "qa-v2-brief"}


def test_an_unknown_prompt_version_is_refused_naming_the_models_file_the_model_and_the_known_versions(data_dir):
    (data_dir / "models.toml").write_text('[models.qwen]\nbase_url = "http://gpu:8000/v1"\nprompt_version = "qa-v9"\n')
    run = run_cli("run", "--model", "qwen", env=cli_env(data_dir), check=False)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"model 'qwen' in {data_dir / 'models.toml'}: prompt_version: unknown prompt version 'qa-v9'" in run.stderr
    assert "the known versions are: qa-v2, qa-v2-brief" in run.stderr


def test_the_model_comparison_view_is_computed_again_once_a_models_tables_changed_and_only_then(tmp_path):
    layout = DataLayout(root=tmp_path / "data")

    def write(model: str, answer: str) -> None:
        write_document(
            Storage(layout.for_model(model)),
            "guide.md",
            {"c1": "The nightly backup copies the database to the archive server at two in the morning."},
            {"c1": [("When does the nightly backup copy the database?", answer, "factual")]},
        )

    write("a", "It copies the database to the archive server at two in the morning.")
    write("b", "It copies the database to the archive server at two in the morning.")
    env = cli_env(layout.root)
    run_cli("compare", env=env)
    query = ("sql", "SELECT model, groundedness_mean, recorded_at FROM model_comparison ORDER BY model", "--format", "json")
    recorded = run_cli(*query, env=env)
    assert "computed again" not in recorded.stderr, "nothing changed since `compare` recorded the rows"
    before = {row["model"]: row for row in json.loads(recorded.stdout)}
    assert set(before) == {"a", "b"}

    # After the rows were recorded: a third model, and another answer from b.
    write("c", "It copies the database to the archive server at two in the morning.")
    write("b", "Every Sunday the cloud vendor mirrors all user photos to tape.")
    changed = run_cli(*query, env=env)
    assert "model_comparison: computed again from the current tables" in changed.stderr
    after = {row["model"]: row for row in json.loads(changed.stdout)}
    assert set(after) == {"a", "b", "c"}, "the new model is in the view without running compare"
    assert after["b"]["groundedness_mean"] < before["b"]["groundedness_mean"], "b's new answer is scored"
    assert after["a"]["recorded_at"] > before["a"]["recorded_at"]

    unchanged = run_cli(*query, env=env)
    assert "computed again" not in unchanged.stderr
    assert json.loads(unchanged.stdout) == json.loads(changed.stdout)


VLLM_COMMAND = Path(sys.executable).parent / "vllm"


@pytest.mark.skipif(not VLLM_COMMAND.exists(), reason="the embedded vLLM build is not installed in this environment")
def test_an_offline_model_whose_vllm_command_cannot_start_fails_naming_the_command_and_the_one_to_use(data_dir):
    write_documents(data_dir, 1)
    (data_dir / "models.toml").write_text(
        f'[models.offline]\nengine = "offline"\nserved_name = "smollm2"\nbatch_command = "{VLLM_COMMAND} run-batch"\n'
    )
    run = run_cli("run", "--model", "offline", env=cli_env(data_dir), check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert f"the batch command {VLLM_COMMAND} run-batch cannot start" in output
    assert "PackageNotFoundError" in output and 'batch_command = "embedded"' in output
