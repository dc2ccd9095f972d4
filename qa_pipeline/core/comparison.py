"""Models side by side on the same chunks: speed, cost, failures and quality of each model's QA pairs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from qa_pipeline.core.layout import MODEL_TABLES, DataLayout, Table
from qa_pipeline.core.offline import OFFLINE_ENDPOINT
from qa_pipeline.core.plots import png_bytes
from qa_pipeline.core.quality import QualityThresholds, refresh_pair_scores, type_balance
from qa_pipeline.core.storage import COMPARISON_SCHEMA, Storage

# The generator configured by QA_PIPELINE_LLM_* (the `qa_pairs` asset), as a row of the comparison.
DEFAULT_MODEL = "default"

# Which way is better for each figure (True: higher), for the plot and for readers of the table.
HIGHER_IS_BETTER = {
    "success_rate": True,
    "output_tokens_per_s": True,
    "chunks_per_s": True,
    "latency_p50_s": False,
    "latency_p95_s": False,
    "tokens_per_accepted_pair": False,
    "server_s_per_1000_accepted": False,
    "groundedness_mean": True,
    "groundedness_p10": True,
    "evidence_score_mean": True,
    "refusal_share": False,
    "duplicate_share": False,
    "type_balance": True,
}


@dataclass
class ModelTables:
    """One model's outputs, as read from its own folder."""

    qa_pairs: pl.DataFrame
    failures: pl.DataFrame
    pair_scores: pl.DataFrame
    benchmark_runs: pl.DataFrame
    judgements: pl.DataFrame | None = None


def load_model_tables(layout: DataLayout) -> dict[str, ModelTables]:
    """Every model's tables: the default generator's (when it has outputs) and each named model's."""
    tables = {}
    for name in (None, *layout.named_models()):
        storage = Storage(layout.for_model(name))
        refresh_pair_scores(storage)  # a model's scores may lag behind its pairs
        read = {table: storage.read_table(table) for table in MODEL_TABLES}
        if read[Table.QA_PAIRS].height == 0 and read[Table.FAILURES].height == 0:
            continue
        judgements = storage.read_table(Table.JUDGEMENTS) if name is None else None
        tables[name or DEFAULT_MODEL] = ModelTables(**read, judgements=judgements)
    return tables


def common_chunks(tables: dict[str, ModelTables]) -> pl.DataFrame:
    """(document, chunk_id) of the chunks every model answered or failed: the ground they are compared on."""
    common = None
    for model in tables.values():
        attempted = pl.concat(
            [model.qa_pairs.select("document", "chunk_id"), model.failures.select("document", "chunk_id")]
        ).unique()
        common = attempted if common is None else common.join(attempted, on=["document", "chunk_id"], how="semi")
    return common if common is not None else pl.DataFrame(schema={"document": pl.String(), "chunk_id": pl.String()})


def compare_models(tables: dict[str, ModelTables], thresholds: QualityThresholds | None = None) -> pl.DataFrame:
    """One row per model, each figure computed on the chunks all models share (see COMPARISON_SCHEMA)."""
    thresholds = thresholds or QualityThresholds()
    common = common_chunks(tables)
    rows = [_figures(name, model, common, thresholds) for name, model in tables.items()]
    return pl.DataFrame(rows, schema=COMPARISON_SCHEMA, orient="row")


def _figures(name: str, model: ModelTables, common: pl.DataFrame, thresholds: QualityThresholds) -> dict:
    on = ["document", "chunk_id"]
    pairs = model.qa_pairs.join(common, on=on, how="semi")
    answered = pairs.unique(subset=on)
    failures = model.failures.join(common, on=on, how="semi").join(answered, on=on, how="anti")
    scores = model.pair_scores.join(pairs.select(*on, "pair_index"), on=[*on, "pair_index"], how="semi")
    attempted = answered.height + failures.height

    grounded = scores["groundedness"].drop_nulls()
    evidence = scores["evidence_score"].drop_nulls()
    refusals = int(scores["refusal"].fill_null(False).sum())
    duplicates = int(scores["duplicate_scope"].is_not_null().sum())
    accepted = scores.filter(
        (pl.col("groundedness").fill_null(0.0) >= thresholds.ungrounded_below)
        & ~pl.col("refusal").fill_null(False)
        & pl.col("duplicate_scope").is_null()
    ).height
    # A batch line has no latency of its own (the batch runner answers them all at once): not a 0 s request.
    asked = pl.concat([answered.select("endpoint", "latency_s"), failures.select("endpoint", "latency_s")])
    latencies = asked.filter(~pl.col("endpoint").fill_null("").str.starts_with("batch:"))["latency_s"].drop_nulls()
    output_tokens = int(answered["completion_tokens"].sum() or 0) + int(failures["completion_tokens"].fill_null(0).sum() or 0)

    level, tokens_per_s, chunks_per_s = _speed(model.benchmark_runs)
    if tokens_per_s is None:  # run at a set concurrency, without a benchmark: its own answers' pace
        tokens_per_s, chunks_per_s = _pace(answered, failures)

    judged = a_share = None
    if model.judgements is not None and model.judgements.height:
        rated = model.judgements.join(pairs.select(*on, "pair_index"), on=[*on, "pair_index"], how="semi")
        rated = rated.filter(pl.col("rating").is_not_null())
        judged = rated.height
        a_share = (rated["rating"] == "A").sum() / judged if judged else None

    reasons = failures.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
    return {
        "model": name,
        "served_model": ", ".join(sorted(set(answered["model"].to_list()) | set(failures["model"].to_list()))),
        "prompt_version": ", ".join(sorted(set(pairs["prompt_version"].drop_nulls().to_list()))),
        "chunks": attempted,
        "success_rate": answered.height / attempted if attempted else None,
        "failures_by_reason": ", ".join(f"{r}: {n}" for r, n in reasons.iter_rows()),
        "recommended_concurrency": level,
        "output_tokens_per_s": tokens_per_s,
        "chunks_per_s": chunks_per_s,
        "latency_p50_s": latencies.quantile(0.5, "linear") if latencies.len() else None,
        "latency_p95_s": latencies.quantile(0.95, "linear") if latencies.len() else None,
        "pairs": pairs.height,
        "accepted_pairs": accepted,
        "tokens_per_accepted_pair": output_tokens / accepted if accepted else None,
        # Server time to produce the model's output at its recommended rate, per 1,000 accepted pairs.
        "server_s_per_1000_accepted": 1000 * output_tokens / tokens_per_s / accepted if tokens_per_s and accepted else None,
        "groundedness_mean": grounded.mean() if grounded.len() else None,
        "groundedness_p10": grounded.quantile(0.1, "linear") if grounded.len() else None,
        "evidence_score_mean": evidence.mean() if evidence.len() else None,
        "refusal_share": refusals / pairs.height if pairs.height else None,
        "duplicate_share": duplicates / pairs.height if pairs.height else None,
        "type_balance": type_balance(dict(pairs.group_by("type").len().iter_rows())),
        "judged": judged,
        "judge_a_share": a_share,
    }


def _speed(benchmark_runs: pl.DataFrame) -> tuple[int | None, float | None, float | None]:
    """(concurrency, output tok/s, chunks/s) at the model's latest recommended level; for an offline
    model, over all its batch runs together (each run of the batch command measures only its own files)."""
    recommended = benchmark_runs.filter(pl.col("recommended")).sort("started_at").tail(1)
    if recommended.height == 0:
        return None, None, None
    row = recommended.row(0, named=True)
    if str(row["endpoint"]).startswith(OFFLINE_ENDPOINT):
        runs = benchmark_runs.filter(pl.col("endpoint") == row["endpoint"])
        seconds = runs["duration_s"].sum()
        tokens = (runs["output_tokens_per_s"].fill_null(0.0) * runs["duration_s"]).sum()
        return None, tokens / seconds if seconds else None, runs["requests"].sum() / seconds if seconds else None
    tokens_per_s = row["sustained_output_tokens_per_s"] or row["output_tokens_per_s"]
    return row["concurrency"], tokens_per_s, row["sustained_requests_per_s"] or row["requests_per_s"]


def _pace(answered: pl.DataFrame, failures: pl.DataFrame) -> tuple[float | None, float | None]:
    """(output tok/s, chunks/s) of a model's served requests, from the first one sent to the last answer
    (batch lines have no time of their own: left out)."""
    columns = [pl.col("endpoint").fill_null(""), pl.col("completion_tokens").fill_null(0), "latency_s"]
    served = pl.concat([
        answered.select(*columns, pl.col("generated_at").alias("at")), failures.select(*columns, pl.col("failed_at").alias("at"))
    ]).filter(~pl.col("endpoint").str.starts_with("batch:") & pl.col("latency_s").is_not_null())
    if served.height == 0:
        return None, None
    answers = served["at"].dt.epoch("us") / 1e6
    seconds = answers.max() - (answers - served["latency_s"]).min()
    if not seconds or seconds <= 0:
        return None, None
    return float(served["completion_tokens"].sum()) / seconds, served.height / seconds


def paired_view(tables: dict[str, ModelTables], document: str | None = None, chunk_id: str | None = None) -> pl.DataFrame:
    """One chunk's pairs from every model, side by side (model, type, question, answer, groundedness).

    Without a chunk named, the first chunk (in document and chunk order) that every model answered.
    """
    on = ["document", "chunk_id"]
    if chunk_id is None:
        answered = None
        for model in tables.values():
            chunks = model.qa_pairs.select(*on).unique()
            answered = chunks if answered is None else answered.join(chunks, on=on, how="semi")
        if answered is None or answered.height == 0:
            return pl.DataFrame()
        if document is not None:
            answered = answered.filter(pl.col("document") == document)
        if answered.height == 0:
            return pl.DataFrame()
        document, chunk_id = answered.sort(on).row(0)
    frames = []
    for name, model in tables.items():
        same_chunk = pl.col("chunk_id") == chunk_id
        pairs = model.qa_pairs.filter(same_chunk & (pl.col("document") == document) if document else same_chunk)
        scored = pairs.join(model.pair_scores.select(*on, "pair_index", "groundedness"), on=[*on, "pair_index"], how="left")
        frames.append(
            scored.select(
                pl.lit(name).alias("model"), "document", "chunk_id", "pair_index", "type", "question", "answer", "groundedness"
            )
        )
    return pl.concat(frames).sort("pair_index", "model") if frames else pl.DataFrame()


def plot_comparison(comparison: pl.DataFrame) -> bytes:
    """One bar chart per figure, the models side by side; each title says which way is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [name for name in HIGHER_IS_BETTER if comparison[name].is_not_null().any()]
    columns = 3
    rows = max(1, -(-len(figures) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(10, 2.4 * rows), dpi=80, squeeze=False)
    models = comparison["model"].to_list()
    for axis, name in zip(axes.flat, figures):
        values = [value if value is not None else 0.0 for value in comparison[name].to_list()]
        axis.bar(models, values, color=[f"C{i}" for i in range(len(models))])
        axis.set_title(f"{name} ({'higher' if HIGHER_IS_BETTER[name] else 'lower'} is better)", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(figures):]:
        axis.axis("off")
    return png_bytes(plt, figure)


def record_comparison(layout: DataLayout) -> tuple[pl.DataFrame, dict[str, ModelTables]]:
    """Compares every model with outputs and writes the rows the `model_comparison` view serves, stamped
    with the time and the fingerprint of the files they come from."""
    tables = load_model_tables(layout)  # first: it may bring a model's pair scores up to date
    comparison = compare_models(tables).with_columns(
        pl.lit(datetime.now(timezone.utc), dtype=COMPARISON_SCHEMA["recorded_at"]).alias("recorded_at"),
        pl.lit(inputs_fingerprint(layout)).alias("inputs_fingerprint"),
    )
    Storage(layout).write_partition(Table.MODEL_COMPARISON, "models", comparison)
    return comparison, tables


def refresh_comparison(layout: DataLayout) -> bool:
    """Computes the `model_comparison` rows again when any model's tables changed since they were
    recorded (or none were); True when it did. Readers of the view then never see stale rows."""
    recorded = Storage(layout).read_table(Table.MODEL_COMPARISON)
    if recorded.height and recorded["inputs_fingerprint"].unique().to_list() == [inputs_fingerprint(layout)]:
        return False
    if recorded.height == 0 and not _input_files(layout):
        return False  # nothing to compare yet: the view stays empty
    record_comparison(layout)
    return True


def inputs_fingerprint(layout: DataLayout) -> str:
    """A digest of the name, size and modification time of every file the comparison reads: any
    write, deletion or new model changes it."""
    digest = hashlib.sha256()
    for path in _input_files(layout):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _input_files(layout: DataLayout) -> list[Path]:
    """Every file of each model's tables, and of the default generator's judgements."""
    files = []
    for name in (None, *layout.named_models()):
        scoped = layout.for_model(name)
        for table in (*MODEL_TABLES, *((Table.JUDGEMENTS,) if name is None else ())):
            folder = scoped.table_dir(table)
            files += sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []
    return files
