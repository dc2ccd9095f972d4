"""`qa-pipeline run`: materializes the asset graph on the persistent Dagster instance, document by document."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.execution.plan.objects import ErrorSource  # no public name; tells an interrupt from a failure

from qa_pipeline.core.documents import discover_documents
from qa_pipeline.core.generation import StalledError
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.report import build_report
from qa_pipeline.core.storage import Storage
from qa_pipeline.defs import assets
from qa_pipeline.defs.partitions import documents as documents_partitions
from qa_pipeline.defs.resources import BASE_URL_ENV, LLMResource, StorageResource
from qa_pipeline.defs.sensors import sync_document_partitions

ALL_ASSETS = [
    assets.source_documents,
    assets.chunks,
    assets.test_sample,
    assets.concurrency_benchmark,
    assets.qa_pairs,
    assets.quality_report,
]

# A CPU-served 135M model saturates early; a full sweep up to 64 would take most of the demo,
# and each level stops sending after a minute (requests in flight still finish).
EMBEDDED_LEVELS = [1, 4, 8]
EMBEDDED_SECONDS_PER_LEVEL = 60.0


@dataclass
class PipelineOptions:
    documents: list[str] | None = None
    limit: int | None = None
    concurrency: int | str | None = None  # a level, or "auto"
    levels: list[int] | None = None
    max_seconds_per_level: float | None = None
    sample_size: int = 100
    max_tokens: int = 1024
    question_types: list[str] | None = None
    skip_benchmark: bool = False
    chunks_only: bool = False
    failed_only: bool = False
    force_regenerate: bool = False
    request_timeout_s: float = 300.0
    stall_timeout_s: float = 900.0
    failure_threshold: float = 0.05


@dataclass
class PipelineOutcome:
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report_markdown: str = ""
    # Why the run ended before every document was tried: "interrupted" (a signal) or "stalled" (the server).
    stopped: str | None = None


def failed_documents(instance: dg.DagsterInstance, keys: list[str]) -> set[str]:
    """Documents whose last `chunks` or `qa_pairs` materialization failed (or was stopped)."""
    failed: set[str] = set()
    for asset in (assets.chunks, assets.qa_pairs):
        statuses = instance.get_status_by_partition(asset.key, keys, documents_partitions) or {}
        failed |= {key for key, status in statuses.items() if status == dg.AssetPartitionStatus.FAILED}
    return failed


def _run_config(options: PipelineOptions) -> dict:
    generation: dict = {"max_tokens": options.max_tokens}
    if options.question_types:
        generation["question_types"] = options.question_types
    benchmark = dict(generation)
    if options.levels:
        benchmark["levels"] = options.levels
    if options.max_seconds_per_level:
        benchmark["max_seconds_per_level"] = options.max_seconds_per_level
    qa = dict(
        generation,
        force_regenerate=options.force_regenerate,
        stall_timeout_s=options.stall_timeout_s,
        failure_threshold=options.failure_threshold,
    )
    if options.concurrency == "auto":
        qa["adaptive_concurrency"] = True
    elif options.concurrency:
        qa["concurrency"] = options.concurrency
    return {
        "ops": {
            "test_sample": {"config": {"size": options.sample_size}},
            "concurrency_benchmark": {"config": benchmark},
            "qa_pairs": {"config": qa},
        },
        "loggers": {"console": {"config": {"log_level": "INFO"}}},
    }


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            user = error.cause or error
            if not user.message:
                return error.message
            text = user.message.strip().splitlines()[-1]
            # "dagster._core.definitions.events.Failure: <what happened>": the user needs what happened.
            qualified_name, separator, rest = text.partition(": ")
            return rest if separator and qualified_name.rsplit(".", 1)[-1] == user.cls_name else text
    return "the run failed (see the Dagster logs)"


def _stop_reason(result: dg.ExecuteInProcessResult) -> str | None:
    """"interrupted" when a signal ended the run, "stalled" when the server stopped making progress:
    either way the next documents must not start."""
    for event in result.all_events:
        data = event.step_failure_data if event.is_step_failure else None
        if data is None:
            continue
        if data.error_source == ErrorSource.INTERRUPT:
            return "interrupted"
        error = data.error
        while error is not None:
            if error.cls_name == StalledError.__name__:
                return "stalled"
            error = error.cause
    return None


def run_pipeline(layout: DataLayout, options: PipelineOptions, log: Callable[[str], None]) -> PipelineOutcome:
    instance = dg.DagsterInstance.get()
    changes = sync_document_partitions(instance, layout)
    if changes.added or changes.removed:
        log(f"documents: {len(changes.added)} new, {len(changes.removed)} removed")
    keys = [s.key for s in discover_documents(layout.sources_dir)]
    selected = [k for k in keys if not options.documents or any(fnmatch.fnmatch(k, p) for p in options.documents)]
    if options.failed_only:
        failed = failed_documents(instance, selected)
        selected = [key for key in selected if key in failed]
        if not selected:
            log("qa-pipeline run --failed: no document failed in its last run; nothing to re-run")
            return PipelineOutcome()
    selected = selected[: options.limit] if options.limit else selected
    if not selected:
        raise SystemExit(f"qa-pipeline run: no documents to process in {layout.sources_dir}")
    log(f"qa-pipeline run: {len(selected)} documents from {layout.sources_dir}")

    embedded = not os.environ.get(BASE_URL_ENV)
    if embedded:
        options = dataclasses.replace(
            options,
            levels=options.levels or EMBEDDED_LEVELS,
            max_seconds_per_level=options.max_seconds_per_level or EMBEDDED_SECONDS_PER_LEVEL,
        )
    outcome = PipelineOutcome()
    resources = {
        "llm": LLMResource(data_dir=str(layout.root), request_timeout_s=options.request_timeout_s),
        "storage": StorageResource(data_dir=str(layout.root), sources_dir=str(layout.sources_dir)),
    }
    run_config = _run_config(options)

    def materialize(selection: list, partition_key: str | None = None) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            ALL_ASSETS,
            selection=selection,
            partition_key=partition_key,
            instance=instance,
            resources=resources,
            run_config={**run_config, "ops": {k: v for k, v in run_config["ops"].items() if _selected(k, selection)}},
            raise_on_error=False,
            tags={"qa_pipeline/launched_by": "cli"},
        )

    def per_document(asset: dg.AssetsDefinition, keys: list[str]) -> list[str]:
        """One run per document; the documents that succeeded. Stops early on an interrupt or a stall."""
        done = []
        for index, key in enumerate(keys, start=1):
            result = materialize([asset], key)
            if result.success:
                done.append(key)
            else:
                outcome.failed[key] = _failure_message(result)
                outcome.stopped = _stop_reason(result)
                if outcome.stopped:
                    break
            log(f"{asset.key.to_user_string()}: {index}/{len(keys)} documents ({len(outcome.failed)} failed)")
        return done

    with ExitStack() as stack:
        chunked = per_document(assets.chunks, selected)
        if outcome.stopped or not chunked:
            return outcome
        if options.chunks_only:
            outcome.succeeded = chunked
            return outcome

        # Started once chunking is done: that needs no LLM, and a run that only chunks starts none.
        if embedded:
            from qa_pipeline.core.embedded import EmbeddedServer

            log("no QA_PIPELINE_LLM_BASE_URL set: using the embedded vLLM server (SmolLM2-135M on CPU)")
            stack.enter_context(EmbeddedServer.for_data_dir(layout, progress=log))

        if not options.skip_benchmark:
            result = materialize([assets.test_sample, assets.concurrency_benchmark])
            if not result.success:
                outcome.failed["concurrency_benchmark"] = _failure_message(result)
                outcome.stopped = _stop_reason(result)
                return outcome

        outcome.succeeded = per_document(assets.qa_pairs, chunked)
        if outcome.stopped:
            return outcome

        materialize([assets.quality_report])
    outcome.report_markdown = build_report(Storage(layout)).markdown()
    return outcome


def _selected(op_name: str, selection: list) -> bool:
    return any(a.key.to_user_string() == op_name for a in selection)
