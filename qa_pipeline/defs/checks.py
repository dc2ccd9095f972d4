"""Asset checks on each `qa_pairs` partition: success rate, groundedness and duplicates, with thresholds
set in the run config. Failing success-rate or groundedness checks block assets downstream in the same run."""

from collections.abc import Callable, Iterator

import dagster as dg

from qa_pipeline.core.quality import (
    PartitionQuality,
    QualityThresholds,
    Verdict,
    duplicates_verdict,
    groundedness_verdict,
    success_rate_verdict,
    summarize_partition,
)
from qa_pipeline.defs.assets import qa_pairs
from qa_pipeline.defs.partitions import documents
from qa_pipeline.defs.resources import StorageResource

_DEFAULTS = QualityThresholds()


class SuccessRateCheckConfig(dg.Config):
    min_success_rate: float = _DEFAULTS.min_success_rate


class GroundednessCheckConfig(dg.Config):
    min_mean_groundedness: float = _DEFAULTS.min_mean_groundedness
    ungrounded_below: float = _DEFAULTS.ungrounded_below
    max_unsupported_share: float = _DEFAULTS.max_unsupported_share


class DuplicatesCheckConfig(dg.Config):
    max_duplicate_share: float = _DEFAULTS.max_duplicate_share


def _results(
    context: dg.AssetCheckExecutionContext,
    storage: StorageResource,
    thresholds: QualityThresholds,
    verdict_of: Callable[[PartitionQuality, QualityThresholds], Verdict],
    severity: dg.AssetCheckSeverity,
) -> Iterator[dg.AssetCheckResult | dg.AssetCheckEvaluation | dg.Output]:
    """One verdict per document of the run.

    A run over one document returns the usual result. A run over several (a backfill under a
    multi-document policy, see defs/assets.py) records an evaluation for each document, since a
    single result could not say which partition it is about; a failing blocking one still fails
    the check's step.
    """
    keys = context.partition_keys
    for document in keys:
        verdict = verdict_of(summarize_partition(storage.storage, document, thresholds), thresholds)
        metadata = {key: value for key, value in verdict.metadata.items() if value is not None}
        if len(keys) == 1:
            yield dg.AssetCheckResult(
                passed=verdict.passed, severity=severity, description=verdict.description, metadata=metadata
            )
            return
        spec = context.check_specs[0]
        yield dg.AssetCheckEvaluation(
            asset_key=spec.asset_key,
            check_name=spec.name,
            passed=verdict.passed,
            severity=severity,
            description=verdict.description,
            metadata=metadata,
            blocking=spec.blocking,
            partition=document,
        )
    yield dg.Output(None)  # the check's step output; the evaluations above carry the verdicts


@dg.asset_check(asset=qa_pairs, partitions_def=documents, blocking=True)
def success_rate(
    context: dg.AssetCheckExecutionContext, config: SuccessRateCheckConfig, storage: StorageResource
):
    """Enough chunks of the document got QA pairs (failures and truncations are in `failures`)."""
    thresholds = QualityThresholds(**config.model_dump())
    yield from _results(context, storage, thresholds, success_rate_verdict, dg.AssetCheckSeverity.ERROR)


@dg.asset_check(asset=qa_pairs, partitions_def=documents, blocking=True)
def groundedness(
    context: dg.AssetCheckExecutionContext, config: GroundednessCheckConfig, storage: StorageResource
):
    """The answers are supported by their chunks: mean groundedness, and few answers that are
    ungrounded, state numbers the chunk does not contain, or refuse to answer."""
    thresholds = QualityThresholds(**config.model_dump())
    yield from _results(context, storage, thresholds, groundedness_verdict, dg.AssetCheckSeverity.ERROR)


@dg.asset_check(asset=qa_pairs, partitions_def=documents)
def duplicates(
    context: dg.AssetCheckExecutionContext, config: DuplicatesCheckConfig, storage: StorageResource
):
    """Few questions repeat (or nearly repeat) an earlier question of the same document; a warning,
    since the export can drop duplicates."""
    thresholds = QualityThresholds(**config.model_dump())
    yield from _results(context, storage, thresholds, duplicates_verdict, dg.AssetCheckSeverity.WARN)


QA_PAIRS_CHECKS = [success_rate, groundedness, duplicates]
