"""Optional quality assets: `judged_sample`, an LLM-as-judge over a seeded sample of QA pairs, with the
`judge` resource (QA_PIPELINE_JUDGE_BASE_URL / QA_PIPELINE_JUDGE_MODEL, else the generator's server);
`model_comparison`, the models side by side."""

import dagster as dg

from qa_pipeline.core import judge as judging
from qa_pipeline.core.comparison import plot_comparison, record_comparison
from qa_pipeline.core.layout import Table
from qa_pipeline.core.quality import QualityThresholds, refresh_pair_scores
from qa_pipeline.defs.assets import qa_pairs, qa_pairs_by_model, table_metadata
from qa_pipeline.defs.resources import LLMResource, StorageResource


class JudgeConfig(dg.Config):
    sample_size: int = 50
    seed: int = 0
    concurrency: int = 8
    max_tokens: int = 512
    ungrounded_below: float = QualityThresholds().ungrounded_below  # what the heuristics call ungrounded


@dg.asset(deps=[qa_pairs], pool="llm_server", kinds={"duckdb"}, group_name="quality")
async def judged_sample(
    context: dg.AssetExecutionContext, config: JudgeConfig, judge: LLMResource, storage: StorageResource
) -> dg.MaterializeResult:
    """A seeded sample of QA pairs rated A/B/C (and hallucinated or not) by an LLM judge, stored in the
    `judgements` view, with the agreement between the judge and the heuristic scores."""
    refresh_pair_scores(storage.storage)
    sample = judging.sample_pairs(storage.storage, config.sample_size, config.seed)
    if sample.height == 0:
        raise dg.Failure("no QA pairs to judge yet: materialize qa_pairs for at least one document first")
    judgements = await judging.judge_pairs(
        judge.client,
        sample,
        context.run.run_id,
        concurrency=config.concurrency,
        max_tokens=config.max_tokens,
        thresholds=QualityThresholds(ungrounded_below=config.ungrounded_below),
        log=context.log.warning,
    )
    storage.storage.write_partition(Table.JUDGEMENTS, context.run.run_id, judgements)
    summary, by_rating = judging.agreement(judgements)
    return dg.MaterializeResult(
        metadata={
            **{key: value for key, value in summary.items() if value is not None},
            "judge_model": judge.client.model or "",
            "by_rating": table_metadata(by_rating),
            "dagster/row_count": judgements.height,
        }
    )


@dg.asset(deps=[qa_pairs, qa_pairs_by_model], kinds={"duckdb"}, group_name="models")
def model_comparison(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Each model on the same chunks: success rate and failure reasons, output tok/s and chunks/s at its
    recommended concurrency, latency, tokens and server time per accepted pair, groundedness, refusals,
    duplicates, question-type balance, judge grades; the rows of the `model_comparison` view."""
    comparison, _ = record_comparison(storage.layout)
    if comparison.height == 0:
        raise dg.Failure("no model has QA pairs yet: materialize qa_pairs or qa_pairs_by_model first")
    path = storage.storage.write_plot("model_comparison.png", plot_comparison(comparison))
    return dg.MaterializeResult(
        metadata={
            "models": comparison.height,
            "chunks": int(comparison["chunks"].max()),
            "comparison": table_metadata(comparison),
            "plot": dg.MetadataValue.path(str(path)),
        }
    )


@dg.definitions
def quality_definitions() -> dg.Definitions:
    """The judge resource is defined with the others (defs/resources.py)."""
    return dg.Definitions(assets=[judged_sample, model_comparison])
