"""The quality report: DuckDB over every partition's outputs, as tables and markdown."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from qa_pipeline.core.storage import Storage

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
SELECT c.document,
       count(*) AS chunks,
       count(*) FILTER (WHERE q.pairs IS NOT NULL) AS chunks_with_pairs,
       count(*) FILTER (WHERE q.pairs IS NULL AND f.chunk_id IS NOT NULL) AS chunks_failed,
       coalesce(sum(q.pairs), 0) AS pairs
FROM chunks c
LEFT JOIN (SELECT document, chunk_id, count(*) AS pairs FROM qa_pairs GROUP BY ALL) q USING (document, chunk_id)
LEFT JOIN (SELECT DISTINCT document, chunk_id FROM failures) f USING (document, chunk_id)
GROUP BY c.document ORDER BY c.document
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

THROUGHPUT_SQL = """
SELECT model, count(DISTINCT chunk_id) AS chunks,
       sum(completion_tokens) FILTER (WHERE pair_index = 0) AS completion_tokens,
       epoch(max(generated_at) - min(generated_at)) AS span_s,
       sum(completion_tokens) FILTER (WHERE pair_index = 0)
         / nullif(epoch(max(generated_at) - min(generated_at)), 0) AS output_tokens_per_s
FROM qa_pairs GROUP BY model ORDER BY model
"""


@dataclass
class QualityReport:
    summary: dict
    per_document: pl.DataFrame
    failures_by_reason: pl.DataFrame
    question_types: pl.DataFrame
    throughput: pl.DataFrame

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
            "## Per document",
            to_markdown_table(self.per_document),
            "",
            "## Failures by reason",
            to_markdown_table(self.failures_by_reason) if self.failures_by_reason.height else "No failures.",
            "",
            "## Question types",
            to_markdown_table(self.question_types),
            "",
            "## Throughput by model",
            to_markdown_table(self.throughput),
        ]
        return "\n".join(lines) + "\n"


def build_report(storage: Storage) -> QualityReport:
    with storage.connect() as connection:

        def frame(sql: str) -> pl.DataFrame:
            return connection.sql(sql).pl()

        return QualityReport(
            summary=frame(SUMMARY_SQL).row(0, named=True),
            per_document=frame(PER_DOCUMENT_SQL),
            failures_by_reason=frame(FAILURES_BY_REASON_SQL),
            question_types=frame(TYPES_SQL),
            throughput=frame(THROUGHPUT_SQL),
        )


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


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"
