"""Dataset exports: JSONL, Parquet and OpenAI chat fine-tuning files, split into train, validation and
evaluation by document (a document is in one split only), optionally filtered by the quality scores."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import BaseModel, Field, model_validator

from qa_pipeline.core.quality import (
    QualityThresholds,
    find_duplicate_questions,
    partition_verdicts,
    refresh_pair_scores,
    summarize_partition,
)
from qa_pipeline.core.storage import Storage, write_parquet_atomic, write_text_atomic

SPLITS = ("train", "validation", "evaluation")
ExportFormat = Literal["jsonl", "parquet", "chat"]
DEFAULT_CHAT_SYSTEM_PROMPT = "You answer questions about the documentation accurately and concisely."

EXPORT_SQL = """
SELECT q.document, q.chunk_id, q.pair_index, q.question, q.answer, q.type, c.content AS context,
       c.heading_path, c.position, q.model, q.prompt_version,
       s.groundedness, coalesce(s.unsupported_numbers, []) AS unsupported_numbers,
       coalesce(s.refusal, false) AS refusal, s.language
FROM qa_pairs q
JOIN chunks c USING (document, chunk_id)
LEFT JOIN pair_scores s USING (document, chunk_id, pair_index)
ORDER BY q.document, c.position, q.pair_index
"""


class ExportOptions(BaseModel):
    """What to export and which pairs to leave out."""

    formats: tuple[ExportFormat, ...] = ("jsonl", "parquet", "chat")
    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    evaluation: float = Field(0.1, ge=0, le=1)
    seed: int = 0
    min_groundedness: float | None = Field(None, ge=0, le=1, description="drop pairs below (or without) this score")
    drop_refusals: bool = False
    drop_invented_numbers: bool = Field(False, description="drop answers with numbers their chunk does not contain")
    drop_duplicates: bool = Field(False, description="keep only the first of duplicate questions, dataset-wide")
    exclude_failing_documents: bool = Field(
        False, description="leave out documents whose success-rate or groundedness check fails"
    )
    thresholds: QualityThresholds = Field(default_factory=QualityThresholds)
    chat_system_prompt: str | None = DEFAULT_CHAT_SYSTEM_PROMPT
    chat_include_passage: bool = Field(False, description="put the chunk in the user message (RAG-style tuning)")

    @model_validator(mode="after")
    def _fractions(self) -> ExportOptions:
        total = self.train + self.validation + self.evaluation
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must add up to 1, got {self.train}+{self.validation}+{self.evaluation}")
        return self

    def fractions(self) -> dict[str, float]:
        return {"train": self.train, "validation": self.validation, "evaluation": self.evaluation}


@dataclass
class ExportSummary:
    out_dir: Path
    rows: dict[str, int]
    documents: dict[str, list[str]]
    dropped: dict[str, int]
    files: list[Path] = field(default_factory=list)


def _position(document: str, seed: int) -> float:
    """Where a document falls in [0, 1): fixed by its name and the seed alone."""
    digest = hashlib.sha256(f"{seed}\0{document}".encode()).hexdigest()
    return int(digest[:15], 16) / 16**15


def assign_splits(documents: list[str], fractions: dict[str, float], seed: int = 0) -> dict[str, str]:
    """document → split. Each document falls in the split whose share of [0, 1) its hash lands in, so
    adding documents never moves the others; when a split with a share would stay empty and another
    has documents to spare, the spare document nearest to it moves over."""
    bounds, start = {}, 0.0
    for split in SPLITS:
        bounds[split] = (start, start + fractions[split])
        start += fractions[split]
    position = {d: _position(d, seed) for d in documents}
    assigned = {
        d: next((s for s in SPLITS if bounds[s][0] <= p < bounds[s][1]), SPLITS[-1]) for d, p in position.items()
    }
    wanted = [s for s in SPLITS if fractions[s] > 0]
    if len(documents) >= len(wanted):
        for empty in (s for s in reversed(wanted) if s not in assigned.values()):
            members = {s: [d for d in documents if assigned[d] == s] for s in SPLITS}
            donor = max((s for s in SPLITS if len(members[s]) > 1), key=lambda s: len(members[s]), default=None)
            if donor is None:
                break
            low, high = bounds[empty]
            nearest = min(members[donor], key=lambda d: (min(abs(position[d] - low), abs(position[d] - high)), d))
            assigned[nearest] = empty
    return assigned


def _failing_documents(storage: Storage, documents: list[str], thresholds: QualityThresholds) -> list[str]:
    failing = []
    for document in documents:
        verdicts = partition_verdicts(summarize_partition(storage, document, thresholds), thresholds)
        if any(not v.passed for v in verdicts if v.check in ("success_rate", "groundedness")):
            failing.append(document)
    return failing


def select_pairs(storage: Storage, options: ExportOptions) -> tuple[pl.DataFrame, dict[str, int]]:
    """The pairs to export (with context and scores) and how many each filter dropped."""
    refresh_pair_scores(storage)
    rows = storage.query(EXPORT_SQL)
    dropped: dict[str, int] = {}

    def drop(reason: str, keep: pl.Expr | pl.Series) -> None:
        nonlocal rows
        before = rows.height
        rows = rows.filter(keep)
        if before - rows.height:
            dropped[reason] = before - rows.height

    if options.exclude_failing_documents:
        failing = _failing_documents(storage, rows["document"].unique().sort().to_list(), options.thresholds)
        drop("failing_document", ~pl.col("document").is_in(failing))
    if options.drop_refusals:
        drop("refusal", ~pl.col("refusal"))
    if options.min_groundedness is not None:
        drop("low_groundedness", pl.col("groundedness").fill_null(-1.0) >= options.min_groundedness)
    if options.drop_invented_numbers:
        drop("invented_numbers", pl.col("unsupported_numbers").list.len() == 0)
    if options.drop_duplicates:
        duplicates = find_duplicate_questions(rows).select("document", "chunk_id", "pair_index")
        before = rows.height
        rows = rows.join(duplicates, on=["document", "chunk_id", "pair_index"], how="anti", maintain_order="left")
        if before - rows.height:
            dropped["duplicate"] = before - rows.height
    return rows, dropped


def export_dataset(storage: Storage, out_dir: Path, options: ExportOptions | None = None) -> ExportSummary:
    """Writes `{split}.jsonl`, `{split}.parquet` and `{split}.chat.jsonl` (as chosen) and a manifest.json."""
    options = options or ExportOptions()
    rows, dropped = select_pairs(storage, options)
    splits = assign_splits(rows["document"].unique().sort().to_list(), options.fractions(), options.seed)
    rows = rows.with_columns(
        split=pl.col("document").replace_strict(splits, default=None, return_dtype=pl.String()),
        id=pl.col("chunk_id") + "-" + pl.col("pair_index").cast(pl.String()),
    )
    records = rows.select(
        "id", "split", "document", "chunk_id", "pair_index", "question", "answer", "type", "context",
        "heading_path", "model", "prompt_version", "groundedness", "language",
    )
    summary = ExportSummary(out_dir=out_dir, rows={}, documents={}, dropped=dropped)
    for split in SPLITS:
        part = records.filter(pl.col("split") == split)
        summary.rows[split] = part.height
        summary.documents[split] = sorted(d for d, s in splits.items() if s == split)
        if "jsonl" in options.formats:
            summary.files.append(_write_text(part.write_ndjson() if part.height else "", out_dir / f"{split}.jsonl"))
        if "parquet" in options.formats:
            path = out_dir / f"{split}.parquet"
            write_parquet_atomic(part, path)
            summary.files.append(path)
        if "chat" in options.formats:
            lines = "".join(json.dumps(_chat_example(row, options), ensure_ascii=False) + "\n"
                            for row in part.iter_rows(named=True))
            summary.files.append(_write_text(lines, out_dir / f"{split}.chat.jsonl"))
    manifest = {
        "created_at": datetime.now(UTC).isoformat(),
        "options": options.model_dump(mode="json"),
        "rows": summary.rows,
        "documents": summary.documents,
        "dropped": dropped,
        "files": [path.name for path in summary.files],
    }
    summary.files.append(_write_text(json.dumps(manifest, indent=2) + "\n", out_dir / "manifest.json"))
    return summary


def _chat_example(row: dict, options: ExportOptions) -> dict:
    """One OpenAI chat fine-tuning example: {"messages": [system?, user, assistant]}."""
    messages = []
    if options.chat_system_prompt:
        messages.append({"role": "system", "content": options.chat_system_prompt})
    user = f"{row['context']}\n\nQuestion: {row['question']}" if options.chat_include_passage else row["question"]
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": row["answer"]})
    return {"messages": messages}


def _write_text(text: str, path: Path) -> Path:
    write_text_atomic(text, path)
    return path
