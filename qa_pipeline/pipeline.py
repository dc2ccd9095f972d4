"""`qa-pipeline run`: launches the project's own definitions on the persistent instance, many documents per run.

The same assets, checks, resources and documents-per-run policy as a backfill from the UI: a run
covers up to QA_PIPELINE_DOCUMENTS_PER_RUN documents (in the order the partitions were added) and
their chunks share one work queue. Chunking is a run of its own first, so a file that cannot be
read fails alone before generation starts for the others.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dagster as dg

from qa_pipeline.core import benchmark as bench
from qa_pipeline.core import settings as defaults
from qa_pipeline.core.client import ClientConfig
from qa_pipeline.core.generation import STOP_REQUESTS
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.report import build_report
from qa_pipeline.core.run_ranges import partition_ranges
from qa_pipeline.core.settings import LLMSettings, ModelConfig, RunSettings, model_config
from qa_pipeline.core.storage import Storage
from qa_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, documents_by_model, model_partition_key
from qa_pipeline.defs.partitions import documents as documents_partitions
from qa_pipeline.defs.partitions import models as models_partitions
from qa_pipeline.defs.resources import LLMResource, ModelsResource, StorageResource
from qa_pipeline.defs.sensors import LAUNCHED_BY_TAG, sync_document_partitions

CHUNKS, TEST_SAMPLE, BENCHMARK = dg.AssetKey("chunks"), dg.AssetKey("test_sample"), dg.AssetKey("concurrency_benchmark")
QA_PAIRS, REPORT = dg.AssetKey("qa_pairs"), dg.AssetKey("quality_report")
MODEL_BENCHMARK, QA_PAIRS_BY_MODEL = dg.AssetKey("model_concurrency_benchmark"), dg.AssetKey("qa_pairs_by_model")
MULTIHOP = dg.AssetKey("multihop_pairs")
PARTITION_TAG = "dagster/partition"

# A CPU-served 135M model saturates early; a full sweep up to 64 would take most of the demo,
# and each level stops sending after a minute (requests in flight still finish).
EMBEDDED_LEVELS = [1, 4, 8]
EMBEDDED_SECONDS_PER_LEVEL = 60.0

# Error classes (by name: they cross Dagster's error serialization) that end the command early.
_INTERRUPTS = {"GenerationInterrupted", "KeyboardInterrupt", "DagsterExecutionInterruptedError"}
_STOPS = {"StalledError": "stalled", "ServerUnavailableError": "unavailable", "StorageFullError": "disk_full"}


@dataclass
class PipelineOptions:
    documents: list[str] | None = None
    limit: int | None = None
    concurrency: int | str | None = None  # a level, or "auto"
    levels: list[int] | None = None
    max_seconds_per_level: float | None = None
    sample_size: int = defaults.DEFAULT_SAMPLE_SIZE
    max_tokens: int = defaults.DEFAULT_MAX_TOKENS
    question_types: list[str] | None = None
    question_type_descriptions: dict[str, str] = field(default_factory=dict)
    skip_benchmark: bool = False
    rebenchmark: bool = False  # sweep even when a recent benchmark of this model and server exists
    chunks_only: bool = False
    failed_only: bool = False
    force_regenerate: bool = False
    request_timeout_s: float | None = None  # None: QA_PIPELINE_REQUEST_TIMEOUT_S
    stall_timeout_s: float | None = None  # None: QA_PIPELINE_STALL_TIMEOUT_S
    failure_threshold: float = defaults.DEFAULT_FAILURE_THRESHOLD
    model: str | None = None  # a named model of QA_PIPELINE_MODELS_FILE: `qa_pairs_by_model` instead of `qa_pairs`
    multihop: bool = False  # also `multihop_pairs` (optional: questions needing two or three chunks)


@dataclass
class CheckVerdict:
    document: str
    check: str
    passed: bool
    description: str


@dataclass
class PipelineOutcome:
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    checks: list[CheckVerdict] = field(default_factory=list)
    report_markdown: str = ""
    runs: list[str] = field(default_factory=list)  # Dagster run ids, for the UI
    # Why the command ended before every document was tried: "interrupted" (a signal), "stalled" or
    # "unavailable" (the server), "disk_full", "server" (checked before any run) or "benchmark".
    stopped: str | None = None


def failed_documents(instance: dg.DagsterInstance, keys: list[str], model: str | None = None) -> set[str]:
    """Documents whose last `chunks` or `qa_pairs` (or the model's `qa_pairs_by_model`) materialization
    failed (or was stopped)."""
    failed: set[str] = set()
    statuses = instance.get_status_by_partition(CHUNKS, keys, documents_partitions) or {}
    failed |= {key for key, status in statuses.items() if status == dg.AssetPartitionStatus.FAILED}
    if model is None:
        statuses = instance.get_status_by_partition(QA_PAIRS, keys, documents_partitions) or {}
    else:
        by_key = {model_partition_key(key, model): key for key in keys}
        statuses = instance.get_status_by_partition(QA_PAIRS_BY_MODEL, list(by_key), documents_by_model) or {}
        statuses = {by_key[key]: status for key, status in statuses.items()}
    return failed | {key for key, status in statuses.items() if status == dg.AssetPartitionStatus.FAILED}


def documents_with_failed_chunks(storage: Storage) -> set[str]:
    """Documents with chunks recorded in `failures`, also those under their failure threshold."""
    return set(storage.query("SELECT DISTINCT document FROM failures")["document"].to_list())


def load_definitions() -> dg.Definitions:
    """The project's definitions, exactly as `dagster dev` and `dg` load them."""
    from qa_pipeline.definitions import defs

    return defs()


class StopRequested(Exception):
    """A stop was asked for between two runs: no further run starts."""


class Launcher:
    """Runs asset selections of the project's definitions in this process, on the persistent instance."""

    def __init__(self, instance: dg.DagsterInstance, resources: dict, ops: dict, log: Callable[[str], None]):
        self.instance = instance
        self.job = load_definitions().resolve_implicit_global_asset_job_def()
        self.resources = resources
        self.ops = ops
        self.log = log
        self.run_ids: list[str] = []

    def launch(
        self, assets: Sequence[dg.AssetKey], keys: Sequence[str] | None = None, partition: str | None = None
    ) -> dg.ExecuteInProcessResult:
        if STOP_REQUESTS.stop.is_set():
            raise StopRequested()
        tags = {LAUNCHED_BY_TAG: "cli"}
        if partition:
            tags[PARTITION_TAG] = partition
        if keys:
            tags.update({RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]})
        selected = {key.to_user_string() for key in assets}
        result = self.job.execute_in_process(
            instance=self.instance,
            asset_selection=list(assets),
            tags=tags,
            run_config={
                "resources": self.resources,
                "ops": {name: config for name, config in self.ops.items() if name in selected},
                "loggers": {"console": {"config": {"log_level": "INFO"}}},
            },
            raise_on_error=False,
        )
        self.run_ids.append(result.run_id)
        return result

    def events(self, result: dg.ExecuteInProcessResult, of_type: dg.DagsterEventType) -> list[dg.DagsterEvent]:
        """The run's events of one type as the instance recorded them (also those of a step that failed)."""
        records = self.instance.get_records_for_run(result.run_id, of_type=of_type).records
        return [record.event_log_entry.dagster_event for record in records if record.event_log_entry.dagster_event]


def run_pipeline(layout: DataLayout, options: PipelineOptions, log: Callable[[str], None]) -> PipelineOutcome:
    outcome = PipelineOutcome()
    try:
        return _run_pipeline(layout, options, log, outcome)
    except StopRequested:
        outcome.stopped = "interrupted"
        return outcome


def _run_pipeline(
    layout: DataLayout, options: PipelineOptions, log: Callable[[str], None], outcome: PipelineOutcome
) -> PipelineOutcome:
    if options.model:
        model_config(layout.root, options.model)  # an unknown name is said before anything runs
    instance = dg.DagsterInstance.get()
    sync = sync_document_partitions(instance, layout, deletions_allowed=not options.chunks_only)
    for line in sync.messages:
        log(line)
    present = [s.key for s in layout.discover_sources()]
    selected = [k for k in present if not options.documents or any(fnmatch.fnmatch(k, p) for p in options.documents)]
    if options.failed_only:
        failed = failed_documents(instance, selected, options.model)
        failed |= documents_with_failed_chunks(Storage(layout.for_model(options.model)))
        selected = [key for key in selected if key in failed]
        if not selected:
            log("qa-pipeline run --failed: no document or chunk failed in its last run; nothing to re-run")
            return outcome
    selected = selected[: options.limit] if options.limit else selected
    if not selected:
        raise SystemExit(f"qa-pipeline run: no documents to process in {layout.sources_dir}")
    log(f"qa-pipeline run: {len(selected)} documents from {layout.sources_dir}")

    per_run = RunSettings.load().documents_per_run
    order = instance.get_dynamic_partitions(documents_partitions.name)
    runs_of = lambda keys: partition_ranges(keys, order, None if per_run == "all" else per_run)  # noqa: E731
    storage = StorageResource(data_dir=str(layout.root), sources_dir=str(layout.sources_dir))
    resources = {"storage": {"config": storage.model_dump(exclude_none=True)}}
    launcher = Launcher(instance, resources, {}, log)
    outcome.runs = launcher.run_ids

    chunked = _run_documents(launcher, [CHUNKS], runs_of(selected), outcome, log)
    if outcome.stopped or not chunked or options.chunks_only:
        outcome.succeeded = chunked
        return outcome
    if options.model:
        return _run_named_model(instance, layout, options, launcher, runs_of(chunked), outcome, log)

    # Read only now: chunking needs no LLM, so a bad LLM setting does not stop it.
    llm_settings = LLMSettings.load(
        flags={"request_timeout_s": "--request-timeout", "stall_timeout_s": "--stall-timeout"},
        request_timeout_s=options.request_timeout_s,
        stall_timeout_s=options.stall_timeout_s,
    )
    generator = LLMResource.from_settings(llm_settings, data_dir=str(layout.root))
    launcher.resources["llm"] = {"config": generator.model_dump(exclude_none=True)}
    launcher.ops = _ops_config(options, llm_settings.embedded)

    embedded_was_running = llm_settings.embedded and _embedded_running(layout)
    if not llm_settings.embedded:
        # The endpoint, the key and the model are checked once, before any run: a wrong one is said
        # once, first, instead of failing every document in turn.
        problem = check_server(launcher.resources["llm"]["config"])
        if problem:
            outcome.failed["LLM server"] = problem
            outcome.stopped = "server"
            return outcome
    server = ClientConfig.parse_base_urls(llm_settings.llm_base_url)[0] if llm_settings.llm_base_url else None
    try:
        if _benchmark_needed(options, Storage(layout), llm_settings.llm_model, server or bench.EMBEDDED_SERVER_NAME, log):
            result = launcher.launch([TEST_SAMPLE, BENCHMARK])
            if not result.success:
                outcome.failed["concurrency_benchmark"] = _failure_messages(result).get("", "the benchmark failed")
                outcome.stopped = _stop_reason(result) or "benchmark"
                return outcome
        outcome.succeeded = _run_documents(launcher, [QA_PAIRS], runs_of(chunked), outcome, log, last_extra=[REPORT])
        if options.multihop and outcome.succeeded and not outcome.stopped:
            multihop = _run_documents(launcher, [MULTIHOP], runs_of(outcome.succeeded), outcome, log)
            outcome.succeeded = [key for key in outcome.succeeded if key in multihop]
    finally:
        if llm_settings.embedded and not embedded_was_running:
            from qa_pipeline.core.embedded import stop_embedded_server

            # This command started it (through the `llm` resource): it stops it too.
            stop_embedded_server(layout, progress=log)
    outcome.report_markdown = build_report(Storage(layout)).markdown()
    return outcome


def _run_named_model(
    instance: dg.DagsterInstance,
    layout: DataLayout,
    options: PipelineOptions,
    launcher: Launcher,
    runs: list[list[str]],
    outcome: PipelineOutcome,
    log: Callable[[str], None],
) -> PipelineOutcome:
    """The chunked documents through one named model: its served name checked on its endpoints first,
    its own benchmark, then `qa_pairs_by_model` over the same ranges of documents as `qa_pairs`."""
    model = model_config(layout.root, options.model)
    if model.name not in instance.get_dynamic_partitions(models_partitions.name):
        instance.add_dynamic_partitions(models_partitions.name, [model.name])
        log(f"models: added {model.name!r} (served as {model.model!r})")
    llm_settings = LLMSettings.load(
        flags={"request_timeout_s": "--request-timeout", "stall_timeout_s": "--stall-timeout"},
        request_timeout_s=options.request_timeout_s,
        stall_timeout_s=options.stall_timeout_s,
    )
    models = ModelsResource(**LLMResource.from_settings(llm_settings, data_dir=str(layout.root)).model_dump(exclude_none=True))
    launcher.resources["models"] = {"config": models.model_dump(exclude_none=True)}
    launcher.ops = _ops_config(options, _served_by_embedded(model, llm_settings, layout))
    # An offline model has no server to ask: its batch command runs inside `qa_pairs_by_model`, and
    # the throughput it measures there stands for its benchmark.
    offline = model.engine == "offline"
    problem = None if offline else check_server(launcher.resources["models"]["config"], model)
    if problem:
        outcome.failed["LLM server"] = problem
        outcome.stopped = "server"
        return outcome
    # Each named model's benchmarks are in its own tables, so any recent one of its served name stands.
    if not offline and _benchmark_needed(options, Storage(layout.for_model(model.name)), model.model, None, log):
        result = launcher.launch([TEST_SAMPLE, MODEL_BENCHMARK], partition=model.name)
        if not result.success:
            outcome.failed["model_concurrency_benchmark"] = _failure_messages(result).get("", "the benchmark failed")
            outcome.stopped = _stop_reason(result) or "benchmark"
            return outcome
    keyed = [[model_partition_key(document, model.name) for document in keys] for keys in runs]
    outcome.succeeded = _run_documents(launcher, [QA_PAIRS_BY_MODEL], keyed, outcome, log)
    outcome.report_markdown = build_report(Storage(layout.for_model(model.name))).markdown()
    return outcome


def _benchmark_needed(
    options: PipelineOptions, storage: Storage, model: str | None, server: str | None, log: Callable[[str], None]
) -> bool:
    """Whether this run sweeps concurrency levels first: not when the level is given, not when skipped,
    and not when the same model on the same server was benchmarked recently (unless `--rebenchmark`)."""
    if options.concurrency is not None:
        log(f"concurrency {options.concurrency} (--concurrency): no benchmark")
        return False
    if options.skip_benchmark:
        return False
    if options.rebenchmark:
        return True
    recent = bench.reusable_benchmark(storage, model, server)
    if recent is None:
        return True
    hours = recent.age().total_seconds() / 3600
    log(
        f"reusing the concurrency benchmark of {recent.started_at:%Y-%m-%d %H:%M} ({hours:.1f} h ago) for this model "
        f"and server: {recent.concurrency} requests in flight (--rebenchmark to measure again; older than "
        f"{bench.REUSE_FOR.days} days, it is measured again anyway)"
    )
    return False


def _run_documents(
    launcher: Launcher,
    assets: list[dg.AssetKey],
    runs: list[list[str]],
    outcome: PipelineOutcome,
    log: Callable[[str], None],
    last_extra: list[dg.AssetKey] | None = None,
) -> list[str]:
    """One run per range of documents; the documents that succeeded. Stops early on an interrupt or a stall."""
    done: list[str] = []
    name = assets[0].to_user_string()
    total = sum(len(keys) for keys in runs)
    for index, keys in enumerate(runs):
        extra = last_extra if last_extra and index == len(runs) - 1 else []
        span = keys[0] if len(keys) == 1 else f"{keys[0]} ... {keys[-1]}"
        log(f"{name}: starting a run over {len(keys)} documents ({span})")
        result = launcher.launch([*assets, *extra], keys)
        materialized = {
            event.partition
            for event in launcher.events(result, dg.DagsterEventType.ASSET_MATERIALIZATION)
            if event.asset_key == assets[0]
        }
        reasons = _failure_messages(result)
        for key in keys:
            if key in materialized:
                done.append(key)
            else:
                outcome.failed[key] = reasons.get(key) or reasons.get("") or "the run failed (see the Dagster UI)"
        outcome.checks.extend(
            CheckVerdict(e.partition or "", e.check_name, e.passed, e.description or "")
            for e in (
                event.event_specific_data
                for event in launcher.events(result, dg.DagsterEventType.ASSET_CHECK_EVALUATION)
            )
        )
        failed_here = sum(key not in materialized for key in keys)
        log(f"{name}: {len(done)}/{total} documents done, {failed_here} failed in run {result.run_id[:8]}")
        outcome.stopped = _stop_reason(result)
        if outcome.stopped:
            break
    return done


def _failure_messages(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """Why documents failed, by document ("" for a failure that names none), from the run's step failures."""
    messages: dict[str, str] = {}
    for event in result.all_events:
        if not event.is_step_failure or event.step_failure_data is None:
            continue
        data = event.step_failure_data
        user = data.user_failure_data
        if user is not None:
            by_document = user.metadata.get("failed_documents")
            if by_document is not None:
                messages.update(by_document.value)
            messages.setdefault("", user.description or "")
            continue
        error = data.error
        cause = (error.cause or error) if error else None
        if cause is not None and cause.message:
            text = cause.message.strip().splitlines()[-1]
            # "qualified.Name: what happened": the user needs what happened.
            qualified_name, separator, rest = text.partition(": ")
            messages.setdefault("", rest if separator and qualified_name.rsplit(".", 1)[-1] == cause.cls_name else text)
    return messages


def _stop_reason(result: dg.ExecuteInProcessResult) -> str | None:
    """Why no further run may start: a signal, a stalled or unreachable server, a full disk (or None)."""
    for event in result.all_events:
        if not event.is_step_failure or event.step_failure_data is None:
            continue
        error = event.step_failure_data.error
        while error is not None:
            if error.cls_name in _INTERRUPTS:
                return "interrupted"
            if error.cls_name in _STOPS:
                return _STOPS[error.cls_name]
            error = error.cause
    if result.dagster_run.status == dg.DagsterRunStatus.CANCELED:
        return "interrupted"
    return None


def check_server(llm_config: dict, model: ModelConfig | None = None) -> str | None:
    """Why the configured endpoint(s) cannot serve the run (unreachable, key refused, model not served), or None.

    With `model`, the named model's endpoints are asked for its served name instead.
    """
    import asyncio

    from qa_pipeline.core.client import LLMClient, ServerError

    async def probe() -> None:
        if model is not None:
            async with ModelsResource(**llm_config).client(model):
                return
        resource = LLMResource(**llm_config)
        async with LLMClient(resource.client_config(ClientConfig.parse_base_urls(resource.base_url), resource.model)) as client:
            await client.resolve_model()

    try:
        asyncio.run(probe())
    except ServerError as error:
        return str(error)
    return None


def _embedded_running(layout: DataLayout) -> bool:
    from qa_pipeline.core.embedded import recorded_server

    return recorded_server(layout) is not None


def _served_by_embedded(model: ModelConfig, llm: LLMSettings, layout: DataLayout) -> bool:
    """Whether a named model's requests go to the embedded server (its benchmark then sweeps the embedded
    levels): its base URL is the one the embedded server recorded, or it has none and the default is embedded."""
    from qa_pipeline.core.embedded import recorded_state

    if model.base_url is None:
        return llm.embedded
    state = recorded_state(layout)
    return state is not None and state.base_url.rstrip("/") in {url.strip().rstrip("/") for url in model.base_url.split(",")}


def _ops_config(options: PipelineOptions, embedded: bool) -> dict:
    generation: dict = {"max_tokens": options.max_tokens}
    if options.question_types:
        generation["question_types"] = options.question_types
    if options.question_type_descriptions:
        generation["question_type_descriptions"] = options.question_type_descriptions
    benchmark = dict(generation)
    levels = options.levels or (EMBEDDED_LEVELS if embedded else None)
    if levels:
        benchmark["levels"] = levels
    seconds = options.max_seconds_per_level or (EMBEDDED_SECONDS_PER_LEVEL if embedded else None)
    if seconds:
        benchmark["max_seconds_per_level"] = seconds
    qa = dict(generation, force_regenerate=options.force_regenerate, failure_threshold=options.failure_threshold)
    if options.concurrency == "auto":
        qa["adaptive_concurrency"] = True
    elif options.concurrency:
        qa["concurrency"] = options.concurrency
    return {
        "test_sample": {"config": {"size": options.sample_size}},
        "concurrency_benchmark": {"config": benchmark},
        "qa_pairs": {"config": qa},
        "model_concurrency_benchmark": {"config": benchmark},
        "qa_pairs_by_model": {"config": qa},
        # One question per group of chunks: the question types are not its settings.
        "multihop_pairs": {"config": {k: v for k, v in qa.items() if k not in ("question_types", "question_type_descriptions")}},
    }
