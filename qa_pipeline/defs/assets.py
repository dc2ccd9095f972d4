"""The asset graph: source documents → chunks → test sample → concurrency benchmark → QA pairs (+ checks) → report.

`chunks` and `qa_pairs` run over many documents at once (their backfill policy): a run is the unit
of work, a partition the unit of change and failure. A document that fails is recorded as failed
on its own; the others of the run are materialized.
"""


import asyncio
import itertools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import dagster as dg
import polars as pl
from pydantic import Field

from qa_pipeline.core import benchmark as bench
from qa_pipeline.core import settings as defaults
from qa_pipeline.core.client import LLMClient
from qa_pipeline.core.settings import LLMSettings, ModelConfig, RunSettings, SettingsError
from qa_pipeline.core.chunking import CHUNK_SCHEMA, chunk_frames, iter_chunks
from qa_pipeline.core.concurrency import AdaptiveLimit, FixedLimit
from qa_pipeline.core.documents import DocumentError, SourceFile, read_document
from qa_pipeline.core.generation import ChunkTasks, GenerationReport, GenerationSettings, Generator
from qa_pipeline.core.offline import journal_results, run_offline, throughput_frame
from qa_pipeline.core.plots import plot_generation_telemetry, telemetry_summary
from qa_pipeline.core.prompts import DEFAULT_QUESTION_TYPES, PROMPT_VERSION
from qa_pipeline.core.layout import Table
from qa_pipeline.core.quality import refresh_pair_scores
from qa_pipeline.core.report import build_report
from qa_pipeline.core.sampling import stratified_sample
from qa_pipeline.core.storage import COMPACT_AFTER_DOCUMENTS, QA_PAIRS_SCHEMA, ChunkResult, Storage
from qa_pipeline.defs.checks import (
    CHECK_SPECS,
    CHECK_SPECS_BY_MODEL,
    QualityChecksConfig,
    blocking_failures,
    check_evaluations,
    document_verdicts,
)
from qa_pipeline.defs.partitions import documents, documents_by_model, models, split_model_partition_key
from qa_pipeline.defs.resources import LLMResource, ModelsResource, StorageResource

_DATA_VERSION_TAG = "dagster/data_version"


def backfill_policy(documents_per_run: int | str) -> dg.BackfillPolicy:
    """How many documents one run of `chunks` and `qa_pairs` covers: a number, or "all" (one run).

    A run starts a Python process and costs seconds of Dagster bookkeeping; for documents of a few
    dozen chunks that is longer than their generation, and between two runs the server's batch
    drains. The documents of a run share one work queue, and one that fails still fails alone.
    """
    if documents_per_run == "all":
        return dg.BackfillPolicy.single_run()
    return dg.BackfillPolicy.multi_run(int(documents_per_run))


DEFAULT_BACKFILL_POLICY = backfill_policy(defaults.DEFAULT_DOCUMENTS_PER_RUN)


SPAN_ONLY_DESCRIPTION = (
    "Documents in the run only because its range of partitions spans them (the sources sensor asks for the "
    "changed ones): one whose outputs are newer than its inputs is not chunked, sent or published again and "
    "records nothing, so its last materialization stands; the others are redone from the cache."
)


class ChunkingConfig(dg.Config):
    target_tokens: int = 400
    overlap_tokens: int = 50
    span_only_documents: list[str] = Field(default_factory=list, description=SPAN_ONLY_DESCRIPTION)


class SampleConfig(dg.Config):
    size: defaults.PositiveInt = defaults.DEFAULT_SAMPLE_SIZE
    seed: int = 0


class GenerationConfig(dg.Config):
    max_tokens: defaults.PositiveInt = defaults.DEFAULT_MAX_TOKENS
    temperature: float = defaults.DEFAULT_TEMPERATURE
    question_types: list[str] = list(DEFAULT_QUESTION_TYPES)
    # type → the one line that tells the model what the type is (defaults: settings.DEFAULT_QUESTION_TYPE_DESCRIPTIONS)
    question_type_descriptions: dict[str, str] = {}

    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            question_types=tuple(self.question_types),
            question_type_descriptions=self.question_type_descriptions,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
        )


class BenchmarkConfig(GenerationConfig):
    levels: list[int] = list(bench.DEFAULT_LEVELS)
    max_seconds_per_level: float = 300.0
    tolerance: float = 0.05


class QAPairsConfig(GenerationConfig):
    concurrency: int | None = None  # None: the benchmark's recommended level, else adaptive
    adaptive_concurrency: bool = False  # `--concurrency auto`: follow the server's load instead of a fixed level
    max_concurrency: defaults.PositiveInt = 256  # the adaptive limit never goes above this
    failure_threshold: defaults.Fraction = defaults.DEFAULT_FAILURE_THRESHOLD
    stall_timeout_s: defaults.Seconds | None = None  # None: the `llm` resource's (QA_PIPELINE_STALL_TIMEOUT_S)
    progress_interval_s: defaults.Seconds = 10.0
    force_regenerate: bool = False
    checks: QualityChecksConfig = QualityChecksConfig()
    span_only_documents: list[str] = Field(default_factory=list, description=SPAN_ONLY_DESCRIPTION)


@dg.observable_source_asset(
    partitions_def=documents, description="Files under the sources folder, by content hash.", group_name="documents"
)
def source_documents(storage: StorageResource) -> dg.DataVersionsByPartition:
    return dg.DataVersionsByPartition(
        {source.key: source.content_hash for source in storage.layout.discover_sources()}
    )


@dg.asset(
    partitions_def=documents,
    deps=[source_documents],
    code_version="chunking-v1",
    backfill_policy=DEFAULT_BACKFILL_POLICY,
    kinds={"parquet"},
    group_name="documents",
)
def chunks(context: dg.AssetExecutionContext, config: ChunkingConfig, storage: StorageResource) -> dg.MaterializeResult:
    """Structure-aware chunks of each document of the run (pre-chunked JSONL passes through).

    A file that cannot be read or chunked fails its own partition, naming the file; the other
    documents of the run are chunked and recorded.
    """
    outcomes: dict[str, dict] = {}
    failed: dict[str, str] = {}
    span_only = set(config.span_only_documents)
    # When the spanned documents' chunks were written (one look at the table, not one per document).
    chunks_written = storage.storage.written_times(Table.CHUNKS, span_only & set(context.partition_keys))
    for document in context.partition_keys:
        # The partition's own file, looked up by its key: the cost of a document does not grow with the folder.
        source = storage.layout.source_file(document)
        if source is None:
            failed[document] = f"document {document!r} is not in {storage.layout.sources_dir}; it was moved or deleted"
            continue
        if chunks_written.get(document, -1) >= source.path.stat().st_mtime_ns:
            continue  # spanned, not asked for, its chunks newer than its file: nothing to do or record
        try:
            outcomes[document] = _chunk_document(context, source, config, storage)
        except DocumentError as error:
            failed[document] = str(error)
        if document in span_only and not outcomes.get(document, {}).get("changed", True):
            continue  # spanned, unchanged: the content its chunks were built from is recorded already
        # The content the chunks were built from, per document: the sources sensor falls back on it.
        context.log_event(
            dg.AssetObservation(
                asset_key=source_documents.key, partition=document, tags={_DATA_VERSION_TAG: source.content_hash}
            )
        )
    totals = {
        "rows_in_run": sum(m["dagster/partition_row_count"] for m in outcomes.values()),
        "tokens_total": sum(m["tokens_total"] for m in outcomes.values()),
    }
    return _partitions_result(context, outcomes, failed, totals)


def _published_after_chunking(storage: Storage, documents: set[str]) -> set[str]:
    """The documents whose qa_pairs or failures table was written after their chunks table: published from
    these chunks (a publication that changed neither keeps both files, so the newer of the two counts)."""
    chunked = storage.written_times(Table.CHUNKS, documents)
    pairs, failures = storage.written_times(Table.QA_PAIRS, documents), storage.written_times(Table.FAILURES, documents)
    return {d for d in chunked if max(pairs.get(d, -1), failures.get(d, -1)) >= chunked[d]}


def _chunk_document(
    context: dg.AssetExecutionContext, source: SourceFile, config: ChunkingConfig, storage: StorageResource
) -> dict:
    """Chunks one file and writes its table; the partition's metadata."""
    parsed = read_document(source)
    chunk_list = iter_chunks(parsed, target_tokens=config.target_tokens, overlap_tokens=config.overlap_tokens)
    first = next(chunk_list, None)
    if first is None:
        raise DocumentError(source.path, "no text to chunk (the document is empty after parsing)", "Add text to it or remove it.")
    figures = {"rows": 0, "tokens_total": 0, "tokens_max": 0}  # the partition's, without keeping its chunks

    def frames():
        for frame in chunk_frames(itertools.chain([first], chunk_list)):
            figures["rows"] += frame.height
            figures["tokens_total"] += int(frame["n_tokens"].sum())
            figures["tokens_max"] = max(figures["tokens_max"], int(frame["n_tokens"].max()))
            yield frame

    # Written as the chunks come; an unchanged document keeps its file (and everything read from it), as
    # in a run spanning edited neighbours.
    written = storage.storage.write_partition_batches(Table.CHUNKS, source.key, frames(), CHUNK_SCHEMA)
    path = storage.layout.partition_file(Table.CHUNKS, source.key)
    for warning in getattr(parsed, "warnings", []) or []:
        context.log.warning(f"{source.path}: {warning}")
    return {
        "dagster/partition_row_count": figures["rows"],
        "dagster/column_schema": column_schema(pl.DataFrame(schema=CHUNK_SCHEMA)),
        "tokens_total": figures["tokens_total"],
        "tokens_max": figures["tokens_max"],
        "path": dg.MetadataValue.path(str(path)),
        "content_hash": source.content_hash,
        "changed": written,
    }


def _partitions_result(
    context: dg.AssetExecutionContext,
    outcomes: dict[str, dict],
    failed: dict[str, str],
    totals: dict,
    extra: dict | None = None,
    left_as_they_were: frozenset[str] = frozenset(),
) -> dg.MaterializeResult | None:
    """The end of a step over one or many documents: each document that failed fails alone.

    Dagster records a materialization for every partition of a step that succeeds, and none for a
    step that fails. So when some documents fail, each one that passed is recorded here as
    materialized, with its own metadata, before the step fails: the failed partitions alone show as
    failed, and a re-run of them redoes only their own work. The documents `left_as_they_were` (spanned
    by the run's range, their outputs unchanged) are not recorded at all: the step then records the
    others one by one and returns None (its output, optional, is not yielded), so their last
    materialization and check verdicts stand and the event log does not grow with the span.
    """
    extra = extra or {}
    keys = context.partition_keys
    if not failed and not left_as_they_were:
        if len(keys) == 1:
            return dg.MaterializeResult(metadata={**outcomes.get(keys[0], {}), **extra})
        return dg.MaterializeResult(metadata={"documents": len(keys), **totals, **extra})
    for document, metadata in outcomes.items():
        if document not in left_as_they_were:
            context.log_event(
                dg.AssetMaterialization(asset_key=context.asset_key, partition=document, metadata={**metadata, **extra})
            )
    if not failed:
        context.log.info(
            f"{len(left_as_they_were)} of the {len(keys)} documents of the run's range were not asked for and are "
            "unchanged: their last materialization stands"
        )
        return None
    failed_documents = {"failed_documents": dg.MetadataValue.json(failed)}  # read by `qa-pipeline run`
    if len(keys) == 1:
        raise dg.Failure(description=failed[keys[0]], metadata={**outcomes.get(keys[0], {}), **extra, **failed_documents})
    listed = "; ".join(f"{document}: {reason}" for document, reason in sorted(failed.items())[:10])
    raise dg.Failure(
        description=(
            f"{len(failed)} of {len(keys)} documents failed ({listed}{'; ...' if len(failed) > 10 else ''}). "
            f"The other {len(keys) - len(failed)} are materialized."
        ),
        metadata={"documents": len(keys), "documents_failed": len(failed), **totals, **extra, **failed_documents},
    )


@dg.asset(deps=[chunks], code_version="sample-v1", kinds={"parquet"}, group_name="documents")
def test_sample(context: dg.AssetExecutionContext, config: SampleConfig, storage: StorageResource) -> dg.MaterializeResult:
    """A seeded sample stratified by service (or document) for the concurrency benchmark."""
    all_chunks = storage.storage.read_table(Table.CHUNKS)
    if all_chunks.height == 0:
        raise dg.Failure("no chunks yet: materialize `chunks` for at least one document first")
    sample = stratified_sample(all_chunks, size=config.size, seed=config.seed)
    storage.storage.write_test_sample(sample)
    by_stratum = sample.group_by("stratum").len().sort("stratum")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sample.height,
            "strata": by_stratum.height,
            "per_stratum": table_metadata(by_stratum),
        }
    )


@dg.asset(deps=[test_sample], pool="llm_server", kinds={"parquet"}, group_name="generation")
async def concurrency_benchmark(
    context: dg.AssetExecutionContext, config: BenchmarkConfig, llm: LLMResource, storage: StorageResource
) -> dg.MaterializeResult:
    """Sweeps concurrency levels on the test sample; recommends the level `qa_pairs` uses."""
    return await _benchmark(context, config, llm.client, storage.storage, config.settings(), "concurrency_benchmark")


@dg.asset(
    deps=[test_sample], partitions_def=models, pool="llm_server", kinds={"parquet"}, group_name="models"
)
async def model_concurrency_benchmark(
    context: dg.AssetExecutionContext, config: BenchmarkConfig, models: ModelsResource, storage: StorageResource
) -> dg.MaterializeResult:
    """The concurrency sweep of one named model on its own endpoint(s); `qa_pairs_by_model` uses its level."""
    model = _named_model(models, context.partition_key)
    async with models.client(model) as client:
        scoped = Storage(storage.layout.for_model(model.name))
        settings = _model_settings(config.settings(), model)
        return await _benchmark(context, config, client, scoped, settings, f"concurrency_benchmark-{model.name}")


async def _benchmark(
    context: dg.AssetExecutionContext,
    config: BenchmarkConfig,
    client: LLMClient,
    storage: Storage,
    settings: GenerationSettings,
    plot_name: str,
) -> dg.MaterializeResult:
    sample = storage.read_test_sample()
    prompts = [settings.messages(row["content"], row["heading_path"]) for row in sample.iter_rows(named=True)]
    results = await bench.sweep(
        client, prompts, config.levels, settings, config.max_seconds_per_level, log=context.log.info
    )
    recommended = bench.recommend_level(results, tolerance=config.tolerance)
    frame = bench.results_frame(results, context.run.run_id, client.model or "", client.server_name, recommended)
    storage.write_partition(Table.BENCHMARK_RUNS, context.run.run_id, frame)
    plot = storage.write_plot(f"{plot_name}.png", bench.plot_sweep(frame))
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
            "levels": table_metadata(table),
            "plot": dg.MetadataValue.md(_inline_png(plot)),
            "plot_path": dg.MetadataValue.path(str(plot)),
        }
    )


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "qa_pairs",
            partitions_def=documents,
            deps=[chunks, concurrency_benchmark],
            # A new prompt marks every partition stale in the UI; the loaded definitions add the model
            # (see `assets_definitions`).
            code_version=PROMPT_VERSION,
            kinds={"parquet"},
            group_name="generation",
            description="QA pairs for every chunk of each document, with their quality checks.",
        )
    ],
    check_specs=CHECK_SPECS,
    # Subsettable, so its checks are optional outputs: they are recorded per document as events.
    can_subset=True,
    pool="llm_server",
    backfill_policy=DEFAULT_BACKFILL_POLICY,
)
async def qa_pairs(
    context: dg.AssetExecutionContext, config: QAPairsConfig, llm: LLMResource, storage: StorageResource
):  # no return annotation: with check outputs, Dagster would read it as one per output
    """QA pairs for every chunk of the run's documents, through one work queue; failures are recorded.

    Each document is published as soon as its last chunk is answered, while the server works on the
    others: its tables are written, its pairs scored and its checks evaluated. A document over the
    failure threshold fails alone; a failed blocking check blocks the assets downstream.
    """
    # Yielded, not returned: with check outputs on the op, Dagster reads a returned tuple as outputs.
    if (result := await _generate_qa_pairs(context, config, llm, storage)) is not None:
        yield result


async def _generate_qa_pairs(
    context: dg.AssetExecutionContext, config: QAPairsConfig, llm: LLMResource, storage: StorageResource
) -> dg.MaterializeResult | None:
    keys = context.partition_keys
    published = await _generate(
        context, config, config.settings(), llm.client, storage.storage, {key: key for key in keys},
        context.asset_key, config.stall_timeout_s or llm.stall_timeout_s, span_only=frozenset(config.span_only_documents),
    )
    return _finish(context, published)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "qa_pairs_by_model",
            partitions_def=documents_by_model,
            deps=[chunks, model_concurrency_benchmark],
            code_version=PROMPT_VERSION,
            kinds={"parquet"},
            group_name="models",
            description=(
                "QA pairs of each document from each named model (QA_PIPELINE_MODELS_FILE), kept apart per "
                "model for `model_comparison`; adding a model is adding a key to the `models` dimension."
            ),
        )
    ],
    check_specs=CHECK_SPECS_BY_MODEL,
    can_subset=True,
    pool="llm_server",
    backfill_policy=DEFAULT_BACKFILL_POLICY,
)
async def qa_pairs_by_model(
    context: dg.AssetExecutionContext, config: QAPairsConfig, models: ModelsResource, storage: StorageResource
):  # no return annotation: with check outputs, Dagster would read it as one per output
    """`qa_pairs` for named models: the run's documents through one work queue per model, each model's
    tables, journal and checks of its own, so a second model never replaces the first one's answers."""
    by_model: dict[str, dict[str, str]] = {}
    for key in context.partition_keys:
        document, model = split_model_partition_key(key)
        by_model.setdefault(model, {})[document] = key
    published = []
    for name, keys in by_model.items():
        model = _named_model(models, name)
        if model.engine == "offline":
            published.append(await asyncio.to_thread(
                _generate_offline, context, config, _model_settings(config.settings(), model), model,
                Storage(storage.layout.for_model(model.name)), keys, context.asset_key,
            ))
            continue
        async with models.client(model) as client:
            published.append(await _generate(
                context, config, _model_settings(config.settings(), model), client,
                Storage(storage.layout.for_model(model.name)), keys, context.asset_key,
                config.stall_timeout_s or models.stall_timeout_s,
            ))
    if (result := _finish(context, _Published.merge(published))) is not None:
        yield result


def _named_model(models: ModelsResource, name: str) -> ModelConfig:
    try:
        return models.named(name)
    except SettingsError as error:
        raise dg.Failure(str(error)) from None


def _model_settings(settings: GenerationSettings, model: ModelConfig) -> GenerationSettings:
    """The run's generation settings with the named model's own sampling and prompt version on top."""
    own = {"temperature": model.temperature, "max_tokens": model.max_tokens, "prompt_version": model.prompt_version}
    return settings.model_copy(update={key: value for key, value in own.items() if value is not None})


class _Outcome(NamedTuple):
    """One published document: its metadata, why it fails (or None), its check verdicts, whether it changed."""

    metadata: dict
    failure: str | None
    verdicts: list
    changed: bool = True


@dataclass
class _Published:
    """What a generation step published, by partition key: metadata, failures, blocked checks, run figures,
    and the spanned documents left as they were (not recorded)."""

    outcomes: dict[str, dict]
    failed: dict[str, str]
    blocked: dict[str, list[str]]
    totals: dict
    run_metadata: dict
    left_as_they_were: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def merge(cls, parts: list["_Published"]) -> "_Published":
        if len(parts) == 1:
            return parts[0]
        totals = {key: sum(part.totals[key] for part in parts) for key in parts[0].totals}
        return cls(
            outcomes={k: v for part in parts for k, v in part.outcomes.items()},
            failed={k: v for part in parts for k, v in part.failed.items()},
            blocked={k: v for part in parts for k, v in part.blocked.items()},
            totals=totals,
            run_metadata={},  # per model: in each model's log lines and throughput plot
            left_as_they_were=frozenset().union(*(part.left_as_they_were for part in parts)),
        )


async def _generate(
    context: dg.AssetExecutionContext,
    config: QAPairsConfig,
    settings: GenerationSettings,
    client: LLMClient,
    storage: Storage,
    keys: dict[str, str],
    asset: dg.AssetKey,
    stall_timeout_s: float,
    span_only: frozenset[str] = frozenset(),
) -> _Published:
    """Generates the QA pairs of `keys` (document → partition key) and publishes each document as it is done.

    A document of `span_only` is in the run only because the run's range spans it. Already published from
    its current chunks, it is not read, sent or published (a run over a range of 300 documents to
    regenerate 50 costs the 50); otherwise it is redone from the cache and, if its tables come out exactly
    as they were, records nothing (no materialization, no check evaluation).
    """
    spanned = _published_after_chunking(storage, set(span_only) & set(keys))
    tasks, missing = _chunk_tasks([document for document in keys if document not in spanned], storage)
    limiter = _concurrency_limit(context, config, storage, client)
    generator = Generator(
        client,
        storage.layout,
        settings,
        limiter,
        log=context.log.info,
        progress_interval_s=config.progress_interval_s,
        stall_timeout_s=stall_timeout_s,
        force=config.force_regenerate,
    )
    thresholds = config.checks.thresholds()
    published: dict[str, _Outcome] = {}

    def record(document: str, outcome: _Outcome) -> None:
        published[document] = outcome
        if document in span_only and not outcome.changed and outcome.failure is None:
            return  # its verdicts on these same tables are recorded already
        for evaluation in check_evaluations(keys[document], outcome.verdicts, asset):
            context.log_event(evaluation)

    async def publish(document: str, results: list[ChunkResult]) -> None:
        # Written, scored and its verdicts recorded while the server still works on the run's other
        # documents: at the end of the run only the last documents are left to publish.
        record(document, await asyncio.to_thread(
            _publish_document, document, results, storage, config.failure_threshold, thresholds
        ))

    report = await generator.run(tasks, on_document_done=publish) if tasks else GenerationReport(results={})
    for document in keys:
        if document not in missing and document not in published and document not in spanned:  # no rows
            record(document, _publish_document(document, [], storage, config.failure_threshold, thresholds))

    left = frozenset(keys[document] for document in spanned) | frozenset(
        keys[document]
        for document, outcome in published.items()
        if document in span_only and not outcome.changed and outcome.failure is None
    )
    return _collect(keys, missing, published, _run_metadata(context, report, limiter, storage), left)


def _collect(
    keys: dict[str, str],
    missing: list[str],
    published: dict[str, _Outcome],
    run_metadata: dict,
    left_as_they_were: frozenset[str] = frozenset(),
) -> _Published:
    """The published documents' outcomes by partition key: materialized, failed, or blocked by a check."""
    failed = {keys[document]: "no chunks: materialize `chunks` for this partition first" for document in missing}
    blocked = {}
    for document, outcome in published.items():
        if outcome.failure is not None:
            failed[keys[document]] = outcome.failure
        elif (names := blocking_failures(outcome.verdicts)) and keys[document] not in left_as_they_were:
            blocked[keys[document]] = names
    outcomes = {keys[document]: o.metadata for document, o in published.items() if o.failure is None}
    totals = {
        "rows_in_run": sum(o.metadata["dagster/partition_row_count"] for o in published.values()),
        "chunks": sum(o.metadata["chunks"] for o in published.values()),
        "chunks_failed": sum(o.metadata["chunks_failed"] for o in published.values()),
    }
    return _Published(outcomes, failed, blocked, totals, run_metadata, left_as_they_were)


def _generate_offline(
    context: dg.AssetExecutionContext,
    config: QAPairsConfig,
    settings: GenerationSettings,
    model: ModelConfig,
    storage: Storage,
    keys: dict[str, str],
    asset: dg.AssetKey,
) -> _Published:
    """The offline engine: what the model's journal lacks goes through its batch command (log streamed),
    each file's results are imported into the journal, then every document is published as online."""
    tasks, missing = _chunk_tasks(list(keys), storage)
    documents_with_chunks = [document for document in keys if document not in missing]
    report = run_offline(
        storage, documents_with_chunks, model.model, settings, model.batch_command, model.requests_per_file,
        context.run.run_id, log=context.log.info,
    )
    if report.requests:
        storage.write_partition(
            Table.BENCHMARK_RUNS, f"offline-{context.run.run_id}", throughput_frame(report, context.run.run_id, model.model, model.batch_command)
        )
    thresholds = config.checks.thresholds()
    published = {}
    for document, results in journal_results(storage, tasks, model.model, settings).items():
        published[document] = _publish_document(document, results, storage, config.failure_threshold, thresholds)
        for evaluation in check_evaluations(keys[document], published[document].verdicts, asset):
            context.log_event(evaluation)
    run_metadata = {
        "requests_sent": report.requests,
        "chunks_from_cache": report.already_done,
        "output_tokens_per_s": report.output_tokens_per_s or 0.0,
        "duration_s": report.duration_s,
    }
    return _collect(keys, missing, published, run_metadata)


def _finish(context: dg.AssetExecutionContext, published: _Published) -> dg.MaterializeResult | None:
    """The step's result: materialized, or failed for the documents that failed (or whose blocking checks did)."""
    keys = context.partition_keys
    outcomes, failed, blocked, totals, run_metadata = (
        published.outcomes, published.failed, published.blocked, published.totals, published.run_metadata
    )
    if blocked and not failed:
        # Materialized, but what depends on it must wait: the same as a failed blocking check.
        single = run_metadata if len(keys) == 1 else {}
        for key, metadata in outcomes.items():
            if key in published.left_as_they_were:
                continue
            context.log_event(
                dg.AssetMaterialization(asset_key=context.asset_key, partition=key, metadata={**metadata, **single})
            )
        listed = "; ".join(f"{key}: {', '.join(names)}" for key, names in sorted(blocked.items())[:10])
        raise dg.Failure(
            description=(
                f"blocking checks failed for {len(blocked)} of {len(keys)} documents ({listed}"
                f"{'; ...' if len(blocked) > 10 else ''}). Their QA pairs are saved; assets downstream wait."
            ),
            metadata={"documents": len(keys), **totals, **run_metadata},
        )
    return _partitions_result(context, outcomes, failed, totals, run_metadata, published.left_as_they_were)


def _run_metadata(context: dg.AssetExecutionContext, report: GenerationReport, limiter, storage: Storage) -> dict:
    """The run's throughput figures; its plot is a file, linked (a picture per run would bloat the event log)."""
    metadata = {
        "requests_sent": report.sent,
        "chunks_from_cache": report.cached,
        "concurrency": "auto" if isinstance(limiter, AdaptiveLimit) else limiter.limit,
        **telemetry_summary(report.telemetry),
        "output_tokens_per_s": report.output_tokens_per_s,
        "duration_s": report.duration_s,
    }
    if len(report.telemetry) > 1:
        keys = context.partition_keys
        title = f"qa_pairs {keys[0]}" if len(keys) == 1 else f"qa_pairs ({len(keys)} documents)"
        model = f"-{storage.layout.model}" if storage.layout.model else ""
        plot = plot_generation_telemetry(report.telemetry, title)
        path = storage.write_plot(f"runs/qa_pairs-{context.run.run_id}{model}.png", plot)
        metadata["throughput_plot"] = dg.MetadataValue.path(str(path))
    return metadata


def _chunk_tasks(documents_in_run: list[str], storage: Storage) -> tuple[ChunkTasks, list[str]]:
    """The chunks to ask about (read from their tables in batches), and the documents that have no chunks yet."""
    tasks = ChunkTasks(storage, documents_in_run)
    return tasks, tasks.missing


def _publish_document(
    document: str, results: list[ChunkResult], storage: Storage, failure_threshold: float, thresholds
) -> _Outcome:
    """Writes one document's tables and scores them; its metadata, why it fails (or None), its check verdicts."""
    published = storage.publish_document(document, results)
    verdicts = document_verdicts(published, thresholds)
    pairs, failures, failure_rate = published.pairs, published.failures, published.failure_rate
    metadata = {
        "dagster/partition_row_count": pairs.height,
        "dagster/column_schema": column_schema(pl.DataFrame(schema=QA_PAIRS_SCHEMA)),  # `pairs` holds a few columns
        "chunks": published.answered,
        "chunks_failed": failures.height,
        "failure_rate": failure_rate,
        "failures_by_reason": dg.MetadataValue.json(
            failures.group_by("reason").len().sort("reason").to_dicts() if failures.height else []
        ),
    }
    if failure_rate <= failure_threshold:
        return _Outcome(metadata, None, verdicts, published.changed)
    return _Outcome(metadata, (
        f"{failures.height} of {published.answered} chunks of {document!r} failed ({failure_rate:.1%} > "
        f"threshold {failure_threshold:.1%}). Finished chunks are saved; re-run this "
        "partition to retry only the failed chunks."
    ), verdicts, published.changed)


@dg.asset(deps=[qa_pairs], code_version="report-v2", kinds={"duckdb"}, group_name="quality")
def quality_report(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Counts, success rate, groundedness, refusals, duplicates, question types, languages, failures by
    reason, latency and throughput, overall and per document; writes the `question_duplicates` table."""
    for compaction in storage.storage.compact(min_documents=COMPACT_AFTER_DOCUMENTS):
        context.log.info(
            f"compacted {compaction.documents} documents of `{compaction.table}` (and {compaction.segments_merged} "
            f"segments) in {compaction.seconds:.1f} s"
        )
    context.log.info("building the quality report over every document's outputs")
    rescored = refresh_pair_scores(storage.storage)
    if rescored:
        context.log.info(f"scored {len(rescored)} documents whose pair_scores were missing or out of date")
    report = build_report(storage.storage)
    storage.storage.write_partition(Table.QUESTION_DUPLICATES, "dataset", report.duplicates)
    markdown = report.markdown()
    path = storage.storage.write_report(markdown)
    plots = {
        f"plot/{name}": dg.MetadataValue.path(str(storage.storage.write_plot(f"{name}.png", image)))
        for name, image in report.plots().items()
    }
    worst = report.per_document.sort(["chunks_failed", "mean_groundedness"], descending=[True, False], nulls_last=True)
    return dg.MaterializeResult(
        metadata={
            **{f"summary/{k}": v for k, v in report.summary.items() if isinstance(v, (int, float))},
            # Bounded: the event log keeps every materialization's metadata, at any number of documents.
            f"per_document (the {min(PER_DOCUMENT_ROWS, worst.height)} with the most failed chunks)": table_metadata(
                worst.head(PER_DOCUMENT_ROWS)
            ),
            # One picture inline for the UI's overview; the others are files, linked.
            "plot/groundedness (inline)": dg.MetadataValue.md(
                _inline_png(storage.layout.report_dir / "groundedness.png", "groundedness")
            ),
            **plots,
            "report": dg.MetadataValue.md(markdown),
            "path": dg.MetadataValue.path(str(path)),
        }
    )


def _concurrency_limit(
    context: dg.AssetExecutionContext, config: QAPairsConfig, storage: Storage, client: LLMClient
) -> FixedLimit | AdaptiveLimit:
    """The configured level, else the benchmark's recommendation for this model and endpoint, else a limit
    that adapts to the server."""
    if config.adaptive_concurrency:
        return AdaptiveLimit(max_limit=config.max_concurrency)
    level = config.concurrency or bench.latest_recommendation(storage, client.model, client.server_name)
    if level is None:
        context.log.warning(
            "no concurrency benchmark yet and no concurrency configured: adapting to the server's load "
            f"(concurrency auto, at most {config.max_concurrency})"
        )
        return AdaptiveLimit(max_limit=config.max_concurrency)
    return FixedLimit(level)


PER_DOCUMENT_ROWS = 100


def table_metadata(frame: pl.DataFrame) -> dg.TableMetadataValue:
    """A small frame as a table the UI renders, sorts and copies (not a Markdown string)."""
    rows = [dg.TableRecord({name: _cell(value) for name, value in row.items()}) for row in frame.iter_rows(named=True)]
    return dg.MetadataValue.table(records=rows, schema=column_schema(frame))


def _cell(value) -> str | int | float | bool | None:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


def column_schema(frame: pl.DataFrame) -> dg.TableSchema:
    """The table's columns and types, as the UI shows them."""
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()])


def _inline_png(image, alt: str = "concurrency sweep") -> str:
    import base64

    data = image if isinstance(image, bytes) else image.read_bytes()
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"


@dg.definitions
def assets_definitions() -> dg.Definitions:
    """The graph as this environment configures it: documents per run, and the model in `qa_pairs`'
    code version, so a new model marks every partition stale (read when the code location loads)."""
    run = RunSettings.load()
    try:
        model = LLMSettings.load().llm_model or "embedded"
    except SettingsError:
        model = "invalid-settings"  # the `llm` resource reports the error to the runs that need it
    policy = backfill_policy(run.documents_per_run)
    version = f"{PROMPT_VERSION}+{model}"
    generated = dg.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version), [qa_pairs])[0]
    return dg.Definitions(
        assets=[
            source_documents,
            chunks.with_attributes(backfill_policy=policy),
            test_sample,
            concurrency_benchmark,
            generated.with_attributes(backfill_policy=policy),
            model_concurrency_benchmark,
            qa_pairs_by_model.with_attributes(backfill_policy=policy),
            quality_report,
        ]
    )
