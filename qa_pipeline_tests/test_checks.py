"""Asset checks on `qa_pairs` partitions and the judged sample, materialized on a temporary Dagster
instance against the simulator. The simulator's answers are sentences of their chunk (grounded by
construction); a bad partition comes from an imported batch output whose answers invent facts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
from pathlib import Path

import pytest

from qa_pipeline.core.batch import export_batch_requests, import_batch_output
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.simulator.process import SimulatorProcess, start_simulator_process
from qa_pipeline.core.storage import Storage
from qa_pipeline.defs.assets import qa_pairs, quality_report
from qa_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, documents
from qa_pipeline.defs.quality_assets import judged_sample
from qa_pipeline.defs.resources import LLMResource, StorageResource
from qa_pipeline_tests.written_outputs import write_sample_chunks

GOOD, BAD = "pep-0020.rst", "pep-3132.rst"


@dataclass
class Pipeline:
    storage: Storage
    instance: dg.DagsterInstance
    resources: dict

    def materialize(self, assets: list, partition: str | None = None, ops: dict | None = None):
        ops = ops or {}
        if any(a is qa_pairs for a in assets):
            ops = {"qa_pairs": {"config": {"concurrency": 4}}, **ops}
        return dg.materialize(
            assets,
            partition_key=partition,
            instance=self.instance,
            resources=self.resources,
            run_config={"ops": ops},
            raise_on_error=False,
        )


def invented_answers(request: dict, number: int) -> dict:
    """A vLLM run-batch output line whose answers state facts no chunk contains."""
    pairs = [
        {"question": f"When was release {number}.{k} of the {kind} API shipped?",
         "answer": f"Release {number}.{k} shipped in {1990 + number} by Initech with {37 * (k + 1)} engineers.",
         "evidence": [f"Initech shipped release {number}.{k} of the {kind} API with {37 * (k + 1)} engineers."],
         "type": kind}
        for k, kind in enumerate(("factual", "conceptual", "comparison"))
    ]
    body = {
        "id": f"chatcmpl-{number}", "object": "chat.completion", "model": request["body"]["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps({"pairs": pairs})},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 60, "total_tokens": 160},
    }
    return {"id": f"vllm-{number}", "custom_id": request["custom_id"],
            "response": {"status_code": 200, "request_id": f"vllm-batch-{number}", "body": body}, "error": None}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with start_simulator_process(zero_latency=True, output_tokens_max=800) as process:
        yield process


@pytest.fixture(scope="module")
def pipeline(sim, tmp_path_factory) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("checks")
    storage = Storage(DataLayout(root=root / "data"))
    for name in (GOOD, BAD):
        write_sample_chunks(storage, name)
    # The bad document's answers arrive from a batch run, as `qa-pipeline import-batch` reads them.
    requests, results = root / "requests.jsonl", root / "results.jsonl"
    export_batch_requests(storage, requests, "sim-model", documents=[BAD])
    lines = [json.loads(line) for line in requests.read_text().splitlines()]
    results.write_text("".join(json.dumps(invented_answers(r, n)) + "\n" for n, r in enumerate(lines)))
    assert import_batch_output(storage, results).imported == len(lines)

    llm = LLMResource(base_url=sim.openai_base_url, model="sim-model", max_retries=0)
    (root / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        instance.add_dynamic_partitions(documents.name, [GOOD, BAD])
        PIPELINE_INSTANCE[:] = [instance]
        yield Pipeline(
            storage=storage,
            instance=instance,
            resources={"llm": llm, "judge": llm, "storage": StorageResource(data_dir=str(storage.layout.root))},
        )


def recorded(result, event_type: dg.DagsterEventType) -> list[dg.DagsterEvent]:
    """The run's events as the instance recorded them (the UI's view, also for a step that failed)."""
    records = PIPELINE_INSTANCE[0].get_records_for_run(result.run_id, of_type=event_type).records
    return [record.event_log_entry.dagster_event for record in records]


def evaluations(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {
        e.event_specific_data.check_name: e.event_specific_data
        for e in recorded(result, dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    }


def materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in recorded(result, dg.DagsterEventType.ASSET_MATERIALIZATION)}


def materialization_metadata(result, asset: str) -> dict:
    (event,) = [
        e for e in recorded(result, dg.DagsterEventType.ASSET_MATERIALIZATION) if e.asset_key.to_user_string() == asset
    ]
    return event.step_materialization_data.materialization.metadata


PIPELINE_INSTANCE: list[dg.DagsterInstance] = []


def test_a_grounded_partition_passes_every_check_and_the_report_follows(pipeline):
    result = pipeline.materialize([qa_pairs, quality_report], GOOD)
    checks = evaluations(result)
    assert result.success, [e.description for e in checks.values()]
    assert set(checks) == {"success_rate", "groundedness", "evidence", "duplicates"}
    assert all(e.passed for e in checks.values())
    assert checks["groundedness"].metadata["mean_groundedness"].value == pytest.approx(1.0)
    assert checks["evidence"].metadata["mean_evidence_score"].value == pytest.approx(1.0)
    assert checks["evidence"].metadata["evidence_unsupported"].value == 0
    assert materialized(result) == {"qa_pairs", "quality_report"}
    report = materialization_metadata(result, "quality_report")
    # One picture inline for the UI's overview; the others are files the metadata links to.
    assert report["plot/groundedness (inline)"].value.startswith("![groundedness](data:image/png;base64,")
    assert Path(report["plot/failures_by_reason"].value).read_bytes().startswith(b"\x89PNG")
    (per_document,) = [value for key, value in report.items() if key.startswith("per_document")]
    assert isinstance(per_document, dg.TableMetadataValue)
    assert {record.data["document"] for record in per_document.records} == {GOOD, BAD}
    pairs = materialization_metadata(result, "qa_pairs")
    assert pairs["dagster/partition_row_count"].value == pairs["chunks"].value * 3
    assert {column.name for column in pairs["dagster/column_schema"].schema.columns} >= {"question", "answer"}
    assert not any("base64" in str(value.value) for value in pairs.values()), "no picture in a partition's metadata"


def test_a_partition_with_invented_answers_fails_its_groundedness_check_and_blocks_downstream(pipeline):
    result = pipeline.materialize([qa_pairs, quality_report], BAD)
    checks = evaluations(result)
    assert not result.success
    grounded = checks["groundedness"]
    assert not grounded.passed and grounded.severity == dg.AssetCheckSeverity.ERROR
    assert "with numbers not in the chunk" in grounded.description
    assert grounded.metadata["with_unsupported_numbers"].value == grounded.metadata["pairs"].value
    assert checks["success_rate"].passed
    evidence = checks["evidence"]
    assert not evidence.passed and evidence.metadata["evidence_unsupported"].value == evidence.metadata["pairs"].value
    assert "evidence that is not in their chunk" in evidence.description
    # The crafted answers came from the journal: nothing was asked again, and the report was blocked.
    assert materialization_metadata(result, "qa_pairs")["requests_sent"].value == 0
    assert materialized(result) == {"qa_pairs"}

    checks = {"min_mean_groundedness": 0.0, "max_unsupported_share": 1.0, "max_unsupported_evidence_share": 1.0}
    lenient = {"qa_pairs": {"config": {"concurrency": 4, "checks": checks}}}
    lenient_checks = evaluations(pipeline.materialize([qa_pairs], BAD, lenient))
    assert lenient_checks["groundedness"].passed and lenient_checks["evidence"].passed


def test_the_judged_sample_stores_verdicts_and_their_agreement_with_the_scores(pipeline):
    result = pipeline.materialize([judged_sample], ops={"judged_sample": {"config": {"sample_size": 12, "seed": 1}}})
    assert result.success
    metadata = result.asset_materializations_for_node("judged_sample")[0].metadata
    assert metadata["judged"].value == 12 and 0.0 <= metadata["agreement"].value <= 1.0
    judgements = pipeline.storage.query(
        "SELECT j.rating, j.hallucination, j.heuristic_flagged, q.document FROM judgements j "
        "JOIN qa_pairs q USING (document, chunk_id, pair_index)"
    )
    assert judgements.height == 12
    assert set(judgements["rating"].to_list()) <= {"A", "B", "C"}
    # The bad document's invented numbers are flagged by the heuristics, the good one's answers are not.
    flags = {
        document: set(judgements.filter(judgements["document"] == document)["heuristic_flagged"].to_list())
        for document in judgements["document"].unique().to_list()
    }
    assert flags == {GOOD: {False}, BAD: {True}}


def test_a_run_over_several_documents_checks_each_document_on_its_own(pipeline):
    """A run covers a range of documents (the default backfill policy): each check records a verdict
    per document, the bad one alone fails its check, and both documents are materialized."""
    job = dg.define_asset_job("qa_pairs_range", selection=dg.AssetSelection.assets(qa_pairs))
    definitions = dg.Definitions(assets=[qa_pairs], jobs=[job], resources=pipeline.resources)
    result = definitions.resolve_job_def("qa_pairs_range").execute_in_process(
        instance=pipeline.instance,
        raise_on_error=False,
        run_config={"ops": {"qa_pairs": {"config": {"concurrency": 4}}}},
        tags={RANGE_START_TAG: GOOD, RANGE_END_TAG: BAD},
    )

    verdicts = {
        (e.event_specific_data.check_name, e.event_specific_data.partition): e.event_specific_data.passed
        for e in recorded(result, dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    }
    assert verdicts == {
        ("success_rate", GOOD): True, ("success_rate", BAD): True,
        ("groundedness", GOOD): True, ("groundedness", BAD): False,
        ("evidence", GOOD): True, ("evidence", BAD): False,
        ("duplicates", GOOD): True, ("duplicates", BAD): True,
    }
    assert not result.success, "a failing blocking check fails its step"
    failed_steps = {event.step_key for event in result.all_events if event.is_step_failure}
    assert failed_steps == {"qa_pairs"}
    statuses = pipeline.instance.get_status_by_partition(qa_pairs.key, [GOOD, BAD], documents)
    assert statuses == {GOOD: dg.AssetPartitionStatus.MATERIALIZED, BAD: dg.AssetPartitionStatus.MATERIALIZED}
