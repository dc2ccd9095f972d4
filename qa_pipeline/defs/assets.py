"""The asset graph: source documents → chunks → test sample → concurrency benchmark → QA pairs → report."""


import asyncio
import os

import dagster as dg
import polars as pl

from qa_pipeline.core import benchmark as bench
from qa_pipeline.core.chunking import chunk_document, chunks_to_frame
from qa_pipeline.core.client import seconds_from_env
from qa_pipeline.core.concurrency import AdaptiveLimit, FixedLimit
from qa_pipeline.core.documents import DocumentError, discover_documents, read_document
from qa_pipeline.core.generation import (
    DEFAULT_STALL_TIMEOUT_S,
    STALL_TIMEOUT_ENV,
    ChunkTask,
    GenerationReport,
    GenerationSettings,
    Generator,
)
from qa_pipeline.core.plots import plot_generation_telemetry, telemetry_summary
from qa_pipeline.core.prompts import DEFAULT_QUESTION_TYPES, PROMPT_VERSION, build_messages
from qa_pipeline.core.quality import refresh_pair_scores, score_partition
from qa_pipeline.core.report import build_report, to_markdown_table
from qa_pipeline.core.sampling import stratified_sample
from qa_pipeline.core.storage import ChunkResult, results_to_frames, write_parquet_atomic, write_text_atomic
from qa_pipeline.defs.partitions import documents
from qa_pipeline.defs.resources import MODEL_ENV, LLMResource, StorageResource


# How many documents one backfill run of `qa_pairs` covers, read when the code loads: 1 (Dagster's
# default, a run per document), a number N (runs of up to N documents), or "all" (one run).
DOCUMENTS_PER_RUN_ENV = "QA_PIPELINE_DOCUMENTS_PER_RUN"


def backfill_policy(documents_per_run: str | None) -> dg.BackfillPolicy | None:
    """The `qa_pairs` backfill policy for a QA_PIPELINE_DOCUMENTS_PER_RUN value.

    A run starts a Python process and costs seconds of Dagster bookkeeping; for documents of a
    few dozen chunks that is longer than the generation itself and the server waits. Several
    documents in one run share one work queue, and a document over its failure threshold still
    fails alone (see _several_documents_result).
    """
    value = (documents_per_run or "1").strip().lower()
    if value == "all":
        return dg.BackfillPolicy.single_run()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{DOCUMENTS_PER_RUN_ENV} must be a positive number or 'all', not {documents_per_run!r}")
    return None if int(value) == 1 else dg.BackfillPolicy.multi_run(int(value))


class ChunkingConfig(dg.Config):
    target_tokens: int = 400
    overlap_tokens: int = 50


class SampleConfig(dg.Config):
    size: int = 100
    seed: int = 0


class GenerationConfig(dg.Config):
    max_tokens: int = 1024
    temperature: float = 0.0
    question_types: list[str] = list(DEFAULT_QUESTION_TYPES)

    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            question_types=tuple(self.question_types), max_tokens=self.max_tokens, temperature=self.temperature
        )


class BenchmarkConfig(GenerationConfig):
    levels: list[int] = list(bench.DEFAULT_LEVELS)
    max_seconds_per_level: float = 300.0
    tolerance: float = 0.05


class QAPairsConfig(GenerationConfig):
    concurrency: int | None = None  # None: the benchmark's recommended level, else adaptive
    adaptive_concurrency: bool = False  # `--concurrency auto`: follow the server's load instead of a fixed level
    max_concurrency: int = 256  # the adaptive limit never goes above this
    failure_threshold: float = 0.05
    stall_timeout_s: float | None = None  # None: $QA_PIPELINE_STALL_TIMEOUT_S, else 900
    progress_interval_s: float = 10.0
    force_regenerate: bool = False


@dg.observable_source_asset(partitions_def=documents, description="Files under the sources folder, by content hash.")
def source_documents(storage: StorageResource) -> dg.DataVersionsByPartition:
    return dg.DataVersionsByPartition(
        {source.key: source.content_hash for source in discover_documents(storage.layout.sources_dir)}
    )


@dg.asset(partitions_def=documents, deps=[source_documents], code_version="chunking-v1")
def chunks(context: dg.AssetExecutionContext, config: ChunkingConfig, storage: StorageResource) -> dg.MaterializeResult:
    """Structure-aware chunks of one document (pre-chunked JSONL passes through)."""
    document = context.partition_key
    sources = {s.key: s for s in discover_documents(storage.layout.sources_dir)}
    if document not in sources:
        raise dg.Failure(
            f"document {document!r} is not in {storage.layout.sources_dir}; it was moved or deleted"
        )
    try:
        parsed = read_document(sources[document])
        chunk_list = chunk_document(parsed, target_tokens=config.target_tokens, overlap_tokens=config.overlap_tokens)
    except DocumentError as error:
        raise dg.Failure(description=str(error), metadata={"file": str(sources[document].path)}) from None
    if not chunk_list:
        raise dg.Failure(f"{sources[document].path}: no text to chunk (the document is empty after parsing)")
    frame = chunks_to_frame(chunk_list)
    path = storage.storage.write_partition("chunks", document, frame)
    for warning in getattr(parsed, "warnings", []) or []:
        context.log.warning(f"{sources[document].path}: {warning}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": frame.height,
            "tokens_total": int(frame["n_tokens"].sum()),
            "tokens_max": int(frame["n_tokens"].max()),
            "path": dg.MetadataValue.path(str(path)),
            "content_hash": sources[document].content_hash,
            "preview": dg.MetadataValue.md(to_markdown_table(frame.select("chunk_id", "heading_path", "n_tokens").head(10))),
        },
        data_version=dg.DataVersion(sources[document].content_hash),
    )


@dg.asset(deps=[chunks], code_version="sample-v1")
def test_sample(context: dg.AssetExecutionContext, config: SampleConfig, storage: StorageResource) -> dg.MaterializeResult:
    """A seeded sample stratified by service (or document) for the concurrency benchmark."""
    all_chunks = storage.storage.read_table("chunks")
    if all_chunks.height == 0:
        raise dg.Failure("no chunks yet: materialize `chunks` for at least one document first")
    sample = stratified_sample(all_chunks, size=config.size, seed=config.seed)
    write_parquet_atomic(sample, storage.layout.test_sample_file)
    by_stratum = sample.group_by("stratum").len().sort("stratum")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sample.height,
            "strata": by_stratum.height,
            "per_stratum": dg.MetadataValue.md(to_markdown_table(by_stratum)),
        }
    )


@dg.asset(deps=[test_sample], pool="llm_server")
async def concurrency_benchmark(
    context: dg.AssetExecutionContext, config: BenchmarkConfig, llm: LLMResource, storage: StorageResource
) -> dg.MaterializeResult:
    """Sweeps concurrency levels on the test sample; recommends the level `qa_pairs` uses."""
    sample = pl.read_parquet(storage.layout.test_sample_file)
    prompts = [
        build_messages(row["content"], row["heading_path"], tuple(config.question_types))
        for row in sample.iter_rows(named=True)
    ]
    results = await bench.sweep(
        llm.client, prompts, config.levels, config.settings(), config.max_seconds_per_level, log=context.log.info
    )
    recommended = bench.recommend_level(results, tolerance=config.tolerance)
    frame = bench.results_frame(
        results, context.run_id, llm.client.model or "", llm.client.endpoints[0].base_url, recommended
    )
    storage.storage.write_partition("benchmark_runs", context.run_id, frame)
    plot = bench.plot_sweep(frame, storage.layout.report_dir / "concurrency_benchmark.png")
    table = frame.select(
        "concurrency", "requests_per_s", "output_tokens_per_s", "success_rate",
        "latency_p50_s", "latency_p95_s", "latency_p99_s",
        "server_running_max", "server_waiting_max", "kv_cache_usage_max",
    )
    return dg.MaterializeResult(
        metadata={
            "recommended_concurrency": recommended,
            "best_output_tokens_per_s": float(frame["output_tokens_per_s"].max()),
            "server_metrics_read": any(r.has_vllm_metrics for r in results),
            "levels": dg.MetadataValue.md(to_markdown_table(table)),
            "plot": dg.MetadataValue.md(_inline_png(plot)),
            "plot_path": dg.MetadataValue.path(str(plot)),
        }
    )


@dg.asset(
    partitions_def=documents,
    deps=[chunks, concurrency_benchmark],
    # A new prompt or model marks every partition stale in the UI (read when the code loads).
    code_version=f"{PROMPT_VERSION}+{os.environ.get(MODEL_ENV) or 'embedded'}",
    pool="llm_server",
    backfill_policy=backfill_policy(os.environ.get(DOCUMENTS_PER_RUN_ENV)),
)
async def qa_pairs(
    context: dg.AssetExecutionContext, config: QAPairsConfig, llm: LLMResource, storage: StorageResource
) -> dg.MaterializeResult:
    """QA pairs for every chunk of one document; failures are recorded, and fail the partition above a threshold.

    A run may cover several documents (a backfill under a multi-partition backfill policy): their
    chunks then share one work queue, so small documents keep the server busy together, and a
    document over the threshold still fails alone (see _several_documents_result).
    """
    documents_in_run = context.partition_keys
    tasks, missing = _chunk_tasks(documents_in_run, storage)
    if missing and len(documents_in_run) == 1:
        raise dg.Failure(f"no chunks for {missing[0]!r}: materialize `chunks` for this partition first")
    limiter = _concurrency_limit(context, config, storage)
    generator = Generator(
        llm.client,
        storage.layout,
        config.settings(),
        limiter,
        log=context.log.info,
        progress_interval_s=config.progress_interval_s,
        stall_timeout_s=(
            config.stall_timeout_s
            if config.stall_timeout_s is not None
            else seconds_from_env(STALL_TIMEOUT_ENV, DEFAULT_STALL_TIMEOUT_S)
        ),
        force=config.force_regenerate,
    )
    outcomes: dict[str, tuple[dict, str | None]] = {}

    async def document_done(document: str, results: list[ChunkResult]) -> None:
        # Written while the server still works on the run's other documents.
        outcomes[document] = await asyncio.to_thread(
            _document_outcome, document, results, storage, config.failure_threshold
        )

    report = await generator.run(tasks, on_document_done=document_done) if tasks else GenerationReport(results={})
    run_metadata = {
        "requests_sent": report.sent,
        "chunks_from_cache": report.cached,
        "concurrency": "auto" if isinstance(limiter, AdaptiveLimit) else limiter.limit,
        **telemetry_summary(report.telemetry),
        "output_tokens_per_s": report.output_tokens_per_s,
        "duration_s": report.duration_s,
    }
    if len(report.telemetry) > 1:
        title = f"qa_pairs {documents_in_run[0]}" if len(documents_in_run) == 1 else f"qa_pairs ({len(tasks)} chunks)"
        plot = plot_generation_telemetry(report.telemetry, title)
        run_metadata["throughput_plot"] = dg.MetadataValue.md(_inline_png(plot, "throughput, concurrency and server load"))
    for document in documents_in_run:
        if document not in missing and document not in outcomes:  # a chunks table without rows
            outcomes[document] = _document_outcome(document, [], storage, config.failure_threshold)
    if len(documents_in_run) > 1:
        return _several_documents_result(context, outcomes, missing, run_metadata)
    metadata, failure = outcomes[documents_in_run[0]]
    metadata = {**metadata, **run_metadata}
    if failure is not None:
        raise dg.Failure(description=failure, metadata=metadata)
    return dg.MaterializeResult(metadata=metadata)


def _chunk_tasks(documents_in_run: list[str], storage: StorageResource) -> tuple[list[ChunkTask], list[str]]:
    """The chunks to ask about, and the documents that have no chunks yet."""
    tasks, missing = [], []
    for document in documents_in_run:
        chunk_frame = storage.storage.read_partition("chunks", document)
        if chunk_frame is None:
            missing.append(document)
            continue
        tasks.extend(
            ChunkTask(document, row["chunk_id"], row["content"], tuple(row["heading_path"]))
            for row in chunk_frame.iter_rows(named=True)
        )
    return tasks, missing


def _document_outcome(
    document: str, results: list[ChunkResult], storage: StorageResource, failure_threshold: float
) -> tuple[dict, str | None]:
    """Writes one document's tables; its metadata, and why it fails (None when under the threshold)."""
    pairs, failures = results_to_frames(results)
    storage.storage.write_partition("qa_pairs", document, pairs)
    storage.storage.write_partition("failures", document, failures)
    score_partition(storage.storage, document)  # pair_scores, read by the asset checks
    failure_rate = failures.height / len(results) if results else 0.0
    metadata = {
        "dagster/row_count": pairs.height,
        "chunks": len(results),
        "chunks_failed": failures.height,
        "failure_rate": failure_rate,
        "failures_by_reason": dg.MetadataValue.json(
            failures.group_by("reason").len().sort("reason").to_dicts() if failures.height else []
        ),
    }
    if failure_rate <= failure_threshold:
        return metadata, None
    return metadata, (
        f"{failures.height} of {len(results)} chunks of {document!r} failed ({failure_rate:.1%} > "
        f"threshold {failure_threshold:.1%}). Finished chunks are saved; re-run this "
        "partition to retry only the failed chunks."
    )


def _several_documents_result(
    context: dg.AssetExecutionContext, outcomes: dict, missing: list[str], run_metadata: dict
) -> dg.MaterializeResult:
    """The end of a run that covers several documents.

    Dagster records a materialization for every partition of a run that succeeds, and none for a
    run that fails. So when some documents fail, each one that passed is recorded here as
    materialized, with its own metadata, before the step fails: the failed partitions alone show
    as failed, and a re-run of them sends only their failed chunks.
    """
    failed = {document: failure for document, (_, failure) in outcomes.items() if failure is not None}
    failed.update({document: "no chunks: materialize `chunks` for this partition first" for document in missing})
    totals = {
        "documents": len(outcomes) + len(missing),
        "dagster/row_count": sum(metadata["dagster/row_count"] for metadata, _ in outcomes.values()),
        "chunks": sum(metadata["chunks"] for metadata, _ in outcomes.values()),
        "chunks_failed": sum(metadata["chunks_failed"] for metadata, _ in outcomes.values()),
    }
    if not failed:
        return dg.MaterializeResult(metadata={**totals, **run_metadata})
    for document, (metadata, failure) in outcomes.items():
        if failure is None:
            context.log_event(dg.AssetMaterialization(asset_key=context.asset_key, partition=document, metadata=metadata))
    listed = "; ".join(f"{document}: {reason}" for document, reason in sorted(failed.items())[:10])
    raise dg.Failure(
        description=(
            f"{len(failed)} of {totals['documents']} documents failed ({listed}"
            f"{'; ...' if len(failed) > 10 else ''}). The other {totals['documents'] - len(failed)} are materialized."
        ),
        metadata={**totals, "documents_failed": len(failed), **run_metadata},
    )


@dg.asset(deps=[qa_pairs], code_version="report-v2")
def quality_report(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Counts, success rate, groundedness, refusals, duplicates, question types, languages, failures by
    reason, latency and throughput, overall and per document; writes the `question_duplicates` table."""
    rescored = refresh_pair_scores(storage.storage)
    if rescored:
        context.log.info(f"scored {len(rescored)} documents whose pair_scores were missing or out of date")
    report = build_report(storage.storage)
    storage.storage.write_partition("question_duplicates", "dataset", report.duplicates)
    markdown = report.markdown()
    path = storage.layout.report_dir / "quality_report.md"
    write_text_atomic(markdown, path)
    plots = {
        f"plot/{name}": dg.MetadataValue.md(_inline_png(image, name.replace("_", " ")))
        for name, image in report.plots().items()
    }
    return dg.MaterializeResult(
        metadata={
            **{f"summary/{k}": v for k, v in report.summary.items() if isinstance(v, (int, float))},
            "per_document": dg.MetadataValue.md(to_markdown_table(report.per_document)),
            **plots,
            "report": dg.MetadataValue.md(markdown),
            "path": dg.MetadataValue.path(str(path)),
        }
    )


def _concurrency_limit(
    context: dg.AssetExecutionContext, config: QAPairsConfig, storage: StorageResource
) -> FixedLimit | AdaptiveLimit:
    """The configured level, else the benchmark's recommendation, else a limit that adapts to the server."""
    if config.adaptive_concurrency:
        return AdaptiveLimit(max_limit=config.max_concurrency)
    level = config.concurrency or bench.latest_recommendation(storage.storage)
    if level is None:
        context.log.warning(
            "no concurrency benchmark yet and no concurrency configured: adapting to the server's load "
            f"(concurrency auto, at most {config.max_concurrency})"
        )
        return AdaptiveLimit(max_limit=config.max_concurrency)
    return FixedLimit(level)


def _inline_png(image, alt: str = "concurrency sweep") -> str:
    import base64

    data = image if isinstance(image, bytes) else image.read_bytes()
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"
