"""Asset checks on each `qa_pairs` partition: success rate, groundedness and duplicates, with thresholds
set in the run config. Failing success-rate or groundedness checks block assets downstream in the same run.

The three checks are one step (`qa_pairs_quality`): each document's figures are read once for all
three, and a backfill over many documents pays one step, not three.
"""

from collections.abc import Iterator

import dagster as dg

from qa_pipeline.core.quality import (
    QualityThresholds,
    duplicates_verdict,
    groundedness_verdict,
    success_rate_verdict,
    summarize_partition,
)
from qa_pipeline.defs.assets import qa_pairs
from qa_pipeline.defs.partitions import documents
from qa_pipeline.defs.resources import StorageResource

_DEFAULTS = QualityThresholds()
_ERROR, _WARN = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN

CHECKS = {
    # name: (verdict, severity, blocking, description)
    "success_rate": (
        success_rate_verdict, _ERROR, True,
        "Enough chunks of the document got QA pairs (failures and truncations are in `failures`).",
    ),
    "groundedness": (
        groundedness_verdict, _ERROR, True,
        "The answers are supported by their chunks: mean groundedness, and few answers that are "
        "ungrounded, state numbers the chunk does not contain, or refuse to answer.",
    ),
    "duplicates": (
        duplicates_verdict, _WARN, False,
        "Few questions repeat (or nearly repeat) an earlier question of the same document; a warning, "
        "since the export can drop duplicates.",
    ),
}


class QualityChecksConfig(dg.Config):
    min_success_rate: float = _DEFAULTS.min_success_rate
    min_mean_groundedness: float = _DEFAULTS.min_mean_groundedness
    ungrounded_below: float = _DEFAULTS.ungrounded_below
    max_unsupported_share: float = _DEFAULTS.max_unsupported_share
    max_duplicate_share: float = _DEFAULTS.max_duplicate_share


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(name, asset=qa_pairs, partitions_def=documents, blocking=blocking, description=description)
        for name, (_, _, blocking, description) in CHECKS.items()
    ],
    can_subset=True,
    name="qa_pairs_quality",
)
def qa_pairs_quality(
    context: dg.AssetCheckExecutionContext, config: QualityChecksConfig, storage: StorageResource
) -> Iterator[dg.AssetCheckResult | dg.AssetCheckEvaluation]:
    """One verdict per selected check and document of the run.

    A run over one document yields the usual results. A run over several (a backfill under a
    multi-document policy, see defs/assets.py) records an evaluation per document, since a result
    could not say which partition it is about; a failing blocking one still fails the step.
    """
    thresholds = QualityThresholds(**config.model_dump())
    selected = [name for name in CHECKS if dg.AssetCheckKey(qa_pairs.key, name) in context.selected_asset_check_keys]
    keys = context.partition_keys
    for document in keys:
        quality = summarize_partition(storage.storage, document, thresholds)
        for name in selected:
            verdict_of, severity, blocking, _ = CHECKS[name]
            verdict = verdict_of(quality, thresholds)
            common = {
                "passed": verdict.passed,
                "severity": severity,
                "description": verdict.description,
                "metadata": {key: value for key, value in verdict.metadata.items() if value is not None},
            }
            if len(keys) == 1:
                yield dg.AssetCheckResult(asset_key=qa_pairs.key, check_name=name, **common)
            else:
                yield dg.AssetCheckEvaluation(
                    asset_key=qa_pairs.key, check_name=name, blocking=blocking, partition=document, **common
                )


QA_PAIRS_CHECKS = [qa_pairs_quality]
