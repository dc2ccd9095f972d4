"""The quality report: DuckDB over every partition's outputs, as tables, markdown and plots."""

from __future__ import annotations

import io
from dataclasses import dataclass

import polars as pl

from qa_pipeline.core.quality import QualityThresholds, find_duplicate_questions, type_balance
from qa_pipeline.core.storage import Storage

UNGROUNDED_BELOW = QualityThresholds().ungrounded_below
MIN_EVIDENCE_SCORE = QualityThresholds().min_evidence_score

SUMMARY_SQL = """
WITH chunk_status AS (
    SELECT c.document, c.chunk_id,
           EXISTS (SELECT 1 FROM qa_pairs q WHERE q.document = c.document AND q.chunk_id = c.chunk_id) AS has_pairs,
           EXISTS (SELECT 1 FROM failures f WHERE f.document = c.document AND f.chunk_id = c.chunk_id) AS failed
    FROM chunks c
),
per_chunk AS (
    SELECT document, chunk_id, any_value(latency_s) AS latency_s,
           any_value(prompt_tokens) AS prompt_tokens, any_value(completion_tokens) AS completion_tokens,
           min(generated_at) AS generated_at
    FROM qa_pairs GROUP BY document, chunk_id
)
SELECT
    (SELECT count(DISTINCT document) FROM chunks) AS documents,
    (SELECT count(*) FROM chunks) AS chunks,
    (SELECT count(*) FILTER (WHERE has_pairs) FROM chunk_status) AS chunks_with_pairs,
    (SELECT count(*) FILTER (WHERE failed AND NOT has_pairs) FROM chunk_status) AS chunks_failed,
    (SELECT count(*) FILTER (WHERE NOT has_pairs AND NOT failed) FROM chunk_status) AS chunks_pending,
    (SELECT count(*) FROM qa_pairs) AS pairs,
    (SELECT count(*) FILTER (WHERE has_pairs) / nullif(count(*) FILTER (WHERE has_pairs OR failed), 0)
       FROM chunk_status) AS success_rate,
    (SELECT quantile_cont(latency_s, 0.5) FROM per_chunk) AS latency_p50_s,
    (SELECT quantile_cont(latency_s, 0.95) FROM per_chunk) AS latency_p95_s,
    (SELECT quantile_cont(latency_s, 0.99) FROM per_chunk) AS latency_p99_s,
    (SELECT sum(prompt_tokens) FROM per_chunk) AS prompt_tokens,
    (SELECT sum(completion_tokens) FROM per_chunk) AS completion_tokens,
    (SELECT avg(length(answer)) FROM qa_pairs) AS answer_chars_mean,
    (SELECT avg(length(question)) FROM qa_pairs) AS question_chars_mean
"""

PER_DOCUMENT_SQL = """
WITH scores AS (
    SELECT document, avg(groundedness) AS mean_groundedness,
           count(*) FILTER (WHERE groundedness < {ungrounded_below}) AS ungrounded,
           count(*) FILTER (WHERE len(unsupported_numbers) > 0) AS invented_numbers,
           count(*) FILTER (WHERE refusal) AS refusals,
           count(*) FILTER (WHERE duplicate_scope IS NOT NULL) AS duplicates
    FROM pair_scores GROUP BY document
)
SELECT c.document,
       count(*) AS chunks,
       count(*) FILTER (WHERE q.pairs IS NOT NULL) AS chunks_with_pairs,
       count(*) FILTER (WHERE q.pairs IS NULL AND f.chunk_id IS NOT NULL) AS chunks_failed,
       count(*) FILTER (WHERE q.pairs IS NULL AND f.truncated) AS chunks_truncated,
       coalesce(sum(q.pairs), 0) AS pairs,
       any_value(s.mean_groundedness) AS mean_groundedness,
       any_value(s.ungrounded) AS ungrounded,
       any_value(s.invented_numbers) AS invented_numbers,
       any_value(s.refusals) AS refusals,
       any_value(s.duplicates) AS duplicates
FROM chunks c
LEFT JOIN (SELECT document, chunk_id, count(*) AS pairs FROM qa_pairs GROUP BY ALL) q USING (document, chunk_id)
LEFT JOIN (SELECT document, chunk_id, bool_or(reason = 'truncated') AS truncated FROM failures GROUP BY ALL) f
    USING (document, chunk_id)
LEFT JOIN scores s USING (document)
GROUP BY c.document ORDER BY c.document
"""

QUALITY_SQL = """
SELECT count(*) AS scored_pairs,
       avg(groundedness) AS mean_groundedness,
       quantile_cont(groundedness, 0.1) AS groundedness_p10,
       count(*) FILTER (WHERE groundedness < {ungrounded_below}) AS pairs_ungrounded,
       count(*) FILTER (WHERE len(unsupported_numbers) > 0) AS pairs_with_invented_numbers,
       count(*) FILTER (WHERE len(unsupported_names) > 0) AS pairs_with_unknown_names,
       count(*) FILTER (WHERE refusal) AS refusals,
       count(*) FILTER (WHERE language <> chunk_language AND language <> 'unknown'
                          AND chunk_language <> 'unknown') AS pairs_in_another_language,
       (SELECT count(DISTINCT chunk_id) FROM failures WHERE reason = 'truncated') AS chunks_truncated,
       avg(evidence_score) AS mean_evidence_score,
       count(*) FILTER (WHERE coalesce(evidence_score, 0) < {min_evidence_score}) AS pairs_evidence_not_in_chunk,
       count(*) FILTER (WHERE coalesce(len(evidence_methods), 0) = 0) AS pairs_without_evidence
FROM pair_scores
"""

# How each evidence quote was found (core.evidence): exact, normalized (case/spacing), fuzzy, not_found.
EVIDENCE_METHODS_SQL = """
SELECT method, count(*) AS quotes FROM (SELECT unnest(evidence_methods) AS method FROM pair_scores)
GROUP BY method ORDER BY method
"""

DIFFICULTY_SQL = """
SELECT coalesce(difficulty, '(none)') AS difficulty, count(*) AS pairs FROM qa_pairs GROUP BY ALL ORDER BY 1
"""

EVIDENCE_NOT_IN_CHUNK_SQL = """
SELECT q.document, q.question, q.evidence, s.evidence_score, s.evidence_methods
FROM qa_pairs q JOIN pair_scores s USING (document, chunk_id, pair_index)
WHERE coalesce(s.evidence_score, 0) < {min_evidence_score}
ORDER BY s.evidence_score NULLS FIRST, q.document, q.chunk_id, q.pair_index
LIMIT 10
"""

TYPES_PER_DOCUMENT_SQL = """
SELECT document, type, count(*) AS pairs FROM qa_pairs GROUP BY ALL ORDER BY document, type
"""

LANGUAGES_SQL = """
SELECT chunk_language, language AS pair_language, count(*) AS pairs
FROM pair_scores GROUP BY ALL ORDER BY pairs DESC
"""

WORST_GROUNDED_SQL = """
SELECT q.document, q.question, q.answer, s.groundedness, s.unsupported_numbers, s.unsupported_names
FROM qa_pairs q JOIN pair_scores s USING (document, chunk_id, pair_index)
WHERE s.groundedness IS NOT NULL
ORDER BY s.groundedness, len(s.unsupported_numbers) DESC, q.document, q.chunk_id, q.pair_index
LIMIT 10
"""

# "Earlier" for duplicates: document by document, chunks in document order.
PAIRS_IN_ORDER_SQL = """
SELECT q.document, q.chunk_id, q.pair_index, q.question
FROM qa_pairs q LEFT JOIN chunks c USING (document, chunk_id)
ORDER BY q.document, c.position, q.chunk_id, q.pair_index
"""

FAILURES_BY_REASON_SQL = """
SELECT reason, count(*) AS chunks, any_value(detail) AS example
FROM failures GROUP BY reason ORDER BY chunks DESC, reason
"""

TYPES_SQL = """
SELECT type, count(*) AS pairs, round(avg(length(answer)), 1) AS answer_chars_mean,
       round(avg(length(question)), 1) AS question_chars_mean
FROM qa_pairs GROUP BY type ORDER BY type
"""

# Served answers only, from the first request sent to the last answer: a batch file's lines (endpoint
# "batch:...") have no time of their own, they are all stamped when the file is imported.
THROUGHPUT_SQL = """
WITH served AS (
  SELECT model, chunk_id, completion_tokens, epoch(generated_at) AS answered, epoch(generated_at) - latency_s AS sent
  FROM qa_pairs WHERE pair_index = 0 AND NOT starts_with(coalesce(endpoint, ''), 'batch:')
)
SELECT model, count(DISTINCT chunk_id) AS chunks, sum(completion_tokens) AS completion_tokens,
       max(answered) - min(sent) AS span_s,
       sum(completion_tokens) / nullif(max(answered) - min(sent), 0) AS output_tokens_per_s
FROM served GROUP BY model ORDER BY model
"""


@dataclass
class QualityReport:
    summary: dict
    per_document: pl.DataFrame
    failures_by_reason: pl.DataFrame
    question_types: pl.DataFrame
    throughput: pl.DataFrame
    types_per_document: pl.DataFrame  # document × type counts
    languages: pl.DataFrame
    worst_grounded: pl.DataFrame
    duplicates: pl.DataFrame  # `question_duplicates` rows over the whole dataset
    groundedness: list[float]
    evidence_not_in_chunk: pl.DataFrame
    difficulty: pl.DataFrame

    def markdown(self) -> str:
        s = self.summary
        lines = [
            "# Quality report",
            "",
            f"- documents: {s['documents']}, chunks: {s['chunks']}, QA pairs: {s['pairs']}",
            f"- chunks with pairs: {s['chunks_with_pairs']}, failed: {s['chunks_failed']}, "
            f"not yet generated: {s['chunks_pending']}",
            f"- success rate: {_percent(s['success_rate'])}",
            f"- latency per chunk p50/p95/p99: {_seconds(s['latency_p50_s'])} / "
            f"{_seconds(s['latency_p95_s'])} / {_seconds(s['latency_p99_s'])}",
            f"- tokens: {s['prompt_tokens'] or 0} prompt, {s['completion_tokens'] or 0} completion",
            f"- mean length: questions {_number(s['question_chars_mean'])} chars, "
            f"answers {_number(s['answer_chars_mean'])} chars",
            "",
            "## Quality",
            f"- groundedness (share of an answer's content found in its chunk): mean "
            f"{_fraction(s['mean_groundedness'])}, 10th percentile {_fraction(s['groundedness_p10'])}",
            f"- pairs below {UNGROUNDED_BELOW:g} groundedness: {s['pairs_ungrounded']}; with numbers not in the "
            f"chunk: {s['pairs_with_invented_numbers']}; with names not in the chunk: {s['pairs_with_unknown_names']}",
            f"- refusals (\"the passage does not say ...\"): {s['refusals']}",
            f"- evidence (each answer's quotes looked up in its chunk: exactly, then ignoring case and spacing, "
            f"then fuzzily at a score >= {MIN_EVIDENCE_SCORE:g}; a pair scores as its weakest quote): mean score "
            f"{_fraction(s['mean_evidence_score'])}; pairs whose evidence is not in their chunk: "
            f"{s['pairs_evidence_not_in_chunk']} of {s['scored_pairs']} "
            f"({_percent(_share(s['pairs_evidence_not_in_chunk'], s['scored_pairs']))}), "
            f"{s['pairs_without_evidence']} of them quoting nothing",
            f"- evidence quotes found: {_counts(s['evidence_methods'])}",
            f"- difficulty labels: {_counts(s['difficulty_counts'])}",
            f"- duplicate questions: {s['duplicates_in_chunk']} within a chunk, {s['duplicates_in_document']} "
            f"within a document, {s['duplicates_across_documents']} across documents",
            f"- question type balance: {_fraction(s['type_balance'])} (1 = every type equally common)",
            f"- pairs in another language than their chunk: {s['pairs_in_another_language']}",
            f"- chunks cut by max_tokens: {s['chunks_truncated']} ({_percent(s['truncation_rate'])})",
            "",
            "## Per document",
            to_markdown_table(self.per_document),
            "",
            "## Question types per document",
            to_markdown_table(self.types_per_document),
            "",
            "## Worst-grounded pairs",
            to_markdown_table(self.worst_grounded) if self.worst_grounded.height else "No scored pairs.",
            "",
            "## Pairs whose evidence is not in their chunk",
            to_markdown_table(self.evidence_not_in_chunk) if self.evidence_not_in_chunk.height else "None.",
            "",
            "## Languages",
            to_markdown_table(self.languages) if self.languages.height else "No scored pairs.",
            "",
            "## Failures by reason",
            to_markdown_table(self.failures_by_reason) if self.failures_by_reason.height else "No failures.",
            "",
            "## Question types",
            to_markdown_table(self.question_types),
            "",
            "## Throughput by model",
            "Served answers, from the first request to the last answer (idle time between runs included); "
            "offline batches are in `benchmark_runs`.",
            "",
            to_markdown_table(self.throughput) if self.throughput.height else "No served answers.",
        ]
        return "\n".join(lines) + "\n"


    def plots(self) -> dict[str, bytes]:
        """PNG images: the distribution of groundedness, failures by reason, question types per document."""
        return {
            "groundedness": plot_groundedness(self.groundedness),
            "failures_by_reason": plot_failures_by_reason(self.failures_by_reason),
            "types_per_document": plot_types_per_document(self.types_per_document),
        }


def build_report(storage: Storage) -> QualityReport:
    """The report over the current outputs; pair scores are read as they are (see quality.refresh_pair_scores)."""
    with storage.connect() as connection:

        def frame(sql: str) -> pl.DataFrame:
            sql = sql.replace("{ungrounded_below}", str(UNGROUNDED_BELOW))
            return connection.sql(sql.replace("{min_evidence_score}", str(MIN_EVIDENCE_SCORE))).pl()

        summary = frame(SUMMARY_SQL).row(0, named=True)
        summary.update(frame(QUALITY_SQL).row(0, named=True))
        types = frame(TYPES_PER_DOCUMENT_SQL)
        duplicates = find_duplicate_questions(frame(PAIRS_IN_ORDER_SQL))
        per_document = frame(PER_DOCUMENT_SQL)
        groundedness = frame("SELECT groundedness FROM pair_scores WHERE groundedness IS NOT NULL")
        difficulty = frame(DIFFICULTY_SQL)
        summary["evidence_methods"] = dict(frame(EVIDENCE_METHODS_SQL).iter_rows())
        summary["difficulty_counts"] = dict(difficulty.iter_rows())
        report = QualityReport(
            summary=summary,
            per_document=per_document,
            failures_by_reason=frame(FAILURES_BY_REASON_SQL),
            question_types=frame(TYPES_SQL),
            throughput=frame(THROUGHPUT_SQL),
            types_per_document=_types_table(types),
            languages=frame(LANGUAGES_SQL),
            worst_grounded=frame(WORST_GROUNDED_SQL),
            duplicates=duplicates,
            groundedness=groundedness["groundedness"].to_list(),
            evidence_not_in_chunk=frame(EVIDENCE_NOT_IN_CHUNK_SQL),
            difficulty=difficulty,
        )
    by_scope = dict(duplicates.group_by("scope").len().iter_rows())
    attempted = (summary["chunks_with_pairs"] or 0) + (summary["chunks_failed"] or 0)
    summary.update(
        duplicates_in_chunk=by_scope.get("chunk", 0),
        duplicates_in_document=by_scope.get("document", 0),
        duplicates_across_documents=by_scope.get("dataset", 0),
        type_balance=type_balance(dict(types.group_by("type").agg(pl.col("pairs").sum()).iter_rows())),
        truncation_rate=(summary["chunks_truncated"] or 0) / attempted if attempted else None,
    )
    return report


def _share(count: int | None, total: int | None) -> float | None:
    return (count or 0) / total if total else None


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "none"


def _types_table(types: pl.DataFrame) -> pl.DataFrame:
    """One row per document, one column per question type, and the balance of the types."""
    if types.height == 0:
        return pl.DataFrame(schema={"document": pl.String()})
    table = types.pivot(on="type", index="document", values="pairs").fill_null(0).sort("document")
    kinds = [column for column in table.columns if column != "document"]
    balance = [type_balance(dict(zip(kinds, row, strict=True))) for row in table.select(kinds).iter_rows()]
    return table.with_columns(type_balance=pl.Series(balance, dtype=pl.Float64()))


def _figure(height: float = 3.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, height), dpi=80)
    return plt, figure, axis


def _png(plt, figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def plot_groundedness(values: list[float]) -> bytes:
    plt, figure, axis = _figure()
    if values:
        axis.hist(values, bins=20, range=(0, 1), color="tab:blue")
        axis.axvline(UNGROUNDED_BELOW, color="tab:red", linestyle="--", label=f"ungrounded below {UNGROUNDED_BELOW:g}")
        axis.legend(fontsize=8)
    else:
        axis.text(0.5, 0.5, "no scored pairs yet", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("groundedness (share of the answer's content found in its chunk)")
    axis.set_ylabel("QA pairs")
    axis.set_title("Distribution of groundedness")
    return _png(plt, figure)


def plot_failures_by_reason(failures: pl.DataFrame) -> bytes:
    plt, figure, axis = _figure(max(2.0, 0.4 * failures.height + 1.2))
    if failures.height:
        axis.barh(failures["reason"].to_list()[::-1], failures["chunks"].to_list()[::-1], color="tab:red")
        axis.set_xlabel("chunks")
    else:
        axis.text(0.5, 0.5, "no failures", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
    axis.set_title("Failures by reason")
    return _png(plt, figure)


def plot_types_per_document(table: pl.DataFrame, max_documents: int = 30) -> bytes:
    kinds = [column for column in table.columns if column not in ("document", "type_balance")]
    shown = table.head(max_documents)
    plt, figure, axis = _figure(max(2.0, 0.3 * shown.height + 1.5))
    if shown.height and kinds:
        names = shown["document"].to_list()[::-1]
        left = [0] * len(names)
        for kind in kinds:
            counts = shown[kind].to_list()[::-1]
            axis.barh(names, counts, left=left, label=kind)
            left = [a + b for a, b in zip(left, counts, strict=True)]
        axis.legend(fontsize=8, loc="lower right")
        axis.set_xlabel("QA pairs")
        axis.tick_params(axis="y", labelsize=7)
    else:
        axis.text(0.5, 0.5, "no QA pairs yet", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
    title = "Question types per document"
    axis.set_title(title if table.height <= max_documents else f"{title} (first {max_documents})")
    return _png(plt, figure)


def to_markdown_table(frame: pl.DataFrame, max_rows: int = 50) -> str:
    if frame.width == 0:
        return "(empty)"
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = [
        "| " + " | ".join(_cell(value) for value in row) + " |" for row in frame.head(max_rows).iter_rows()
    ]
    if frame.height > max_rows:
        rows.append(f"| … {frame.height - max_rows} more rows |" + " |" * (frame.width - 1))
    return "\n".join([header, rule, *rows])


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")[:120]


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"
