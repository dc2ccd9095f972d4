"""The quality checks of each `qa_pairs` partition: success rate, groundedness, evidence and duplicates.

They are evaluated inside the `qa_pairs` step, for each document as soon as its tables are written,
so a run over many documents gives one verdict per document even when another document of the run
fails. Failing success-rate or groundedness checks block the assets downstream.
"""

from collections.abc import Iterable

import dagster as dg

from qa_pipeline.core.quality import (
    QualityThresholds,
    Verdict,
    duplicates_verdict,
    evidence_verdict,
    groundedness_verdict,
    success_rate_verdict,
    summarize,
)
from qa_pipeline.core.storage import PublishedDocument
from qa_pipeline.defs.partitions import documents, documents_by_model

_DEFAULTS = QualityThresholds()
_ERROR, _WARN = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN
QA_PAIRS = dg.AssetKey("qa_pairs")

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
    "evidence": (
        evidence_verdict, _ERROR, True,
        "Each answer's evidence quotes are in its chunk (found exactly, ignoring case and spacing, or "
        "fuzzily above a score): few pairs quote text the chunk does not contain, or quote nothing.",
    ),
    "duplicates": (
        duplicates_verdict, _WARN, False,
        "Few questions repeat (or nearly repeat) an earlier question of the same document; a warning, "
        "since the export can drop duplicates.",
    ),
}

def check_specs(
    asset: dg.AssetKey, partitions_def: dg.PartitionsDefinition, names: Iterable[str] | None = None
) -> list[dg.AssetCheckSpec]:
    """The checks of a QA pairs asset (`qa_pairs`, `qa_pairs_by_model` per document and model, or the
    `names` that apply to `multihop_pairs`)."""
    return [
        dg.AssetCheckSpec(name, asset=asset, partitions_def=partitions_def, blocking=blocking, description=description)
        for name, (_, _, blocking, description) in CHECKS.items()
        if names is None or name in names
    ]


CHECK_SPECS = check_specs(QA_PAIRS, documents)
QA_PAIRS_BY_MODEL = dg.AssetKey("qa_pairs_by_model")
CHECK_SPECS_BY_MODEL = check_specs(QA_PAIRS_BY_MODEL, documents_by_model)


class QualityChecksConfig(dg.Config):
    """Thresholds of the checks (part of `qa_pairs`' config, under `checks`)."""

    min_success_rate: float = _DEFAULTS.min_success_rate
    min_mean_groundedness: float = _DEFAULTS.min_mean_groundedness
    ungrounded_below: float = _DEFAULTS.ungrounded_below
    max_unsupported_share: float = _DEFAULTS.max_unsupported_share
    max_duplicate_share: float = _DEFAULTS.max_duplicate_share
    min_evidence_score: float = _DEFAULTS.min_evidence_score
    max_unsupported_evidence_share: float = _DEFAULTS.max_unsupported_evidence_share

    def thresholds(self) -> QualityThresholds:
        return QualityThresholds(**self.model_dump())


def document_verdicts(published: PublishedDocument, thresholds: QualityThresholds) -> list[Verdict]:
    """Every check's verdict on one document's tables as just published (called from a worker thread)."""
    p = published
    quality = summarize(p.document, p.chunks, p.pairs, p.failures, p.scores, thresholds)
    return [verdict_of(quality, thresholds) for verdict_of, _, _, _ in CHECKS.values()]


def check_evaluations(
    partition: str, verdicts: Iterable[Verdict], asset: dg.AssetKey = QA_PAIRS
) -> list[dg.AssetCheckEvaluation]:
    """The verdicts as Dagster check evaluations of one partition (a document, or a document and model)."""
    evaluations = []
    for verdict in verdicts:
        _, severity, blocking, _ = CHECKS[verdict.check]
        evaluations.append(
            dg.AssetCheckEvaluation(
                asset_key=asset,
                check_name=verdict.check,
                passed=verdict.passed,
                severity=severity,
                blocking=blocking,
                partition=partition,
                description=verdict.description,
                metadata={key: value for key, value in verdict.metadata.items() if value is not None},
            )
        )
    return evaluations


def blocking_failures(verdicts: Iterable[Verdict]) -> list[str]:
    """Names of the failed checks that block downstream assets."""
    return [v.check for v in verdicts if not v.passed and CHECKS[v.check][2]]
