"""The optional `multihop_pairs` asset: questions needing two or three related chunks of a document
(core/multihop.py), through the same generator, journal and checks as `qa_pairs`; not run unless asked."""

import asyncio

import dagster as dg

from qa_pipeline.core import settings as defaults
from qa_pipeline.core.generation import GenerationReport, Generator
from qa_pipeline.core.multihop import MAX_HOPS, MULTIHOP_TABLES, MultiHopSettings, document_hop_tasks, multihop_verdicts
from qa_pipeline.core.prompts import MULTIHOP_PROMPT_VERSION
from qa_pipeline.core.storage import ChunkResult, Storage
from qa_pipeline.defs.assets import (
    DEFAULT_BACKFILL_POLICY,
    _concurrency_limit,
    _partitions_result,
    chunks,
    column_schema,
    concurrency_benchmark,
)
from qa_pipeline.defs.checks import QualityChecksConfig, blocking_failures, check_evaluations, check_specs
from qa_pipeline.defs.partitions import documents
from qa_pipeline.defs.resources import LLMResource, StorageResource

MULTIHOP_PAIRS = dg.AssetKey("multihop_pairs")
MULTIHOP_CHECKS = ("success_rate", "evidence")


class MultiHopConfig(dg.Config):
    max_tokens: defaults.PositiveInt = defaults.DEFAULT_MAX_TOKENS
    temperature: float = defaults.DEFAULT_TEMPERATURE
    max_hops: int = MAX_HOPS  # 2: pairs of chunks only
    concurrency: int | None = None  # None: the benchmark's recommended level, else adaptive
    adaptive_concurrency: bool = False
    max_concurrency: defaults.PositiveInt = 256
    failure_threshold: defaults.Fraction = defaults.DEFAULT_FAILURE_THRESHOLD
    stall_timeout_s: defaults.Seconds | None = None
    progress_interval_s: defaults.Seconds = 10.0
    force_regenerate: bool = False
    checks: QualityChecksConfig = QualityChecksConfig()

    def settings(self) -> MultiHopSettings:
        return MultiHopSettings(max_tokens=self.max_tokens, temperature=self.temperature)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            MULTIHOP_PAIRS,
            partitions_def=documents,
            deps=[chunks, concurrency_benchmark],
            code_version=MULTIHOP_PROMPT_VERSION,
            kinds={"parquet"},
            group_name="generation",
            description=(
                "Optional: one question per group of two or three related chunks of each document (same "
                "section, or shared rare terms), with evidence quoted from every chunk. "
                "`qa-pipeline run --multihop` or select it here."
            ),
        )
    ],
    check_specs=check_specs(MULTIHOP_PAIRS, documents, MULTIHOP_CHECKS),
    can_subset=True,
    pool="llm_server",
    backfill_policy=DEFAULT_BACKFILL_POLICY,
)
async def multihop_pairs(
    context: dg.AssetExecutionContext, config: MultiHopConfig, llm: LLMResource, storage: StorageResource
):  # no return annotation: with check outputs, Dagster would read it as one per output
    """Multi-hop pairs for the run's documents through one work queue; each document is published (its
    tables written, its checks evaluated) as soon as its last group is answered."""
    yield await _generate_multihop(context, config, llm, storage.storage)


async def _generate_multihop(
    context: dg.AssetExecutionContext, config: MultiHopConfig, llm: LLMResource, storage: Storage
) -> dg.MaterializeResult:
    keys = context.partition_keys
    tasks, missing = document_hop_tasks(storage, keys, config.max_hops)
    client = llm.client
    limiter = _concurrency_limit(context, config, storage, client)
    generator = Generator(
        client, storage.layout, config.settings(), limiter, log=context.log.info,
        progress_interval_s=config.progress_interval_s,
        stall_timeout_s=config.stall_timeout_s or llm.stall_timeout_s, force=config.force_regenerate,
    )
    thresholds = config.checks.thresholds()
    outcomes: dict[str, dict] = {}
    failed = {document: "no chunks: materialize `chunks` for this partition first" for document in missing}

    def publish(document: str, results: list[ChunkResult]) -> None:
        published = storage.publish_document(document, results, MULTIHOP_TABLES)
        verdicts = multihop_verdicts(document, published.answered, published.pairs, published.failures, thresholds)
        for evaluation in check_evaluations(document, verdicts, MULTIHOP_PAIRS):
            context.log_event(evaluation)
        rate = published.failure_rate
        outcomes[document] = {
            "dagster/partition_row_count": published.pairs.height,
            "dagster/column_schema": column_schema(published.pairs),
            "groups": published.answered,
            "groups_failed": published.failures.height,
            "failure_rate": rate,
        }
        if rate > config.failure_threshold:
            failed[document] = (
                f"{published.failures.height} of {published.answered} multi-hop groups of {document!r} failed "
                f"({rate:.1%} > threshold {config.failure_threshold:.1%}); see `multihop_failures`. "
                "Re-run this partition to retry only the failed groups."
            )
        elif names := blocking_failures(verdicts):
            context.log.warning(f"{document}: multi-hop checks failed: {', '.join(names)}")

    async def on_document_done(document: str, results: list[ChunkResult]) -> None:
        await asyncio.to_thread(publish, document, results)

    report = await generator.run(tasks, on_document_done=on_document_done) if tasks else GenerationReport(results={})
    for document in keys:
        if document not in missing and document not in outcomes:  # too few chunks to group
            publish(document, [])
    for document in failed:
        outcomes.pop(document, None)
    totals = {
        "rows_in_run": sum(m["dagster/partition_row_count"] for m in outcomes.values()),
        "groups": sum(m["groups"] for m in outcomes.values()),
    }
    run_metadata = {"requests_sent": report.sent, "groups_from_cache": report.cached, "duration_s": report.duration_s}
    return _partitions_result(context, outcomes, failed, totals, run_metadata)


@dg.definitions
def multihop_definitions() -> dg.Definitions:
    return dg.Definitions(assets=[multihop_pairs])
