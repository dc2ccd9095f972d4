"""Asset checks on each `qa_pairs` partition: success rate, groundedness and duplicates, with thresholds
set in the run config. Failing success-rate or groundedness checks block assets downstream in the same run."""

import dagster as dg

from qa_pipeline.core.quality import (
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


def _result(verdict: Verdict, severity: dg.AssetCheckSeverity) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=verdict.passed,
        severity=severity,
        description=verdict.description,
        metadata={key: value for key, value in verdict.metadata.items() if value is not None},
    )


@dg.asset_check(asset=qa_pairs, partitions_def=documents, blocking=True)
def success_rate(
    context: dg.AssetCheckExecutionContext, config: SuccessRateCheckConfig, storage: StorageResource
) -> dg.AssetCheckResult:
    """Enough chunks of the document got QA pairs (failures and truncations are in `failures`)."""
    thresholds = QualityThresholds(**config.model_dump())
    quality = summarize_partition(storage.storage, context.partition_key, thresholds)
    return _result(success_rate_verdict(quality, thresholds), dg.AssetCheckSeverity.ERROR)


@dg.asset_check(asset=qa_pairs, partitions_def=documents, blocking=True)
def groundedness(
    context: dg.AssetCheckExecutionContext, config: GroundednessCheckConfig, storage: StorageResource
) -> dg.AssetCheckResult:
    """The answers are supported by their chunks: mean groundedness, and few answers that are
    ungrounded, state numbers the chunk does not contain, or refuse to answer."""
    thresholds = QualityThresholds(**config.model_dump())
    quality = summarize_partition(storage.storage, context.partition_key, thresholds)
    return _result(groundedness_verdict(quality, thresholds), dg.AssetCheckSeverity.ERROR)


@dg.asset_check(asset=qa_pairs, partitions_def=documents)
def duplicates(
    context: dg.AssetCheckExecutionContext, config: DuplicatesCheckConfig, storage: StorageResource
) -> dg.AssetCheckResult:
    """Few questions repeat (or nearly repeat) an earlier question of the same document; a warning,
    since the export can drop duplicates."""
    thresholds = QualityThresholds(**config.model_dump())
    quality = summarize_partition(storage.storage, context.partition_key, thresholds)
    return _result(duplicates_verdict(quality, thresholds), dg.AssetCheckSeverity.WARN)


QA_PAIRS_CHECKS = [success_rate, groundedness, duplicates]
