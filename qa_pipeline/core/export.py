"""Dataset exports: JSONL, Parquet, OpenAI chat fine-tuning files, a BEIR folder and a Hugging Face dataset
folder, split into train, validation and evaluation by a grouping key (the document, or a metadata field of
pre-chunked input; a group is in one split only), optionally filtered by the quality scores."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import BaseModel, Field, model_validator

from qa_pipeline.core.evidence import FUZZY_MIN_SCORE
from qa_pipeline.core.export_formats import HF_SPLITS, write_beir, write_hf
from qa_pipeline.core.quality import (
    QualityThresholds,
    find_duplicate_questions,
    partition_verdicts,
    refresh_pair_scores,
    summarize_documents,
)
from qa_pipeline.core.storage import Storage, write_parquet_atomic, write_text_atomic

SPLITS = ("train", "validation", "evaluation")
ExportFormat = Literal["jsonl", "parquet", "chat", "beir", "hf"]
DEFAULT_FORMATS: tuple[ExportFormat, ...] = ("jsonl", "parquet", "chat")
# The split key: the document, or a field of a pre-chunked record's metadata (chunks without it keep their document).
DOCUMENT_GROUPING = "document"
DEFAULT_CHAT_SYSTEM_PROMPT = "You answer questions about the documentation accurately and concisely."

EXPORT_SQL = """
SELECT q.document, q.chunk_id, q.pair_index, q.question, q.answer, q.type, q.difficulty,
       coalesce(q.evidence, []) AS evidence, c.content AS context,
       c.heading_path, c.position, q.model, q.prompt_version,
       s.groundedness, coalesce(s.unsupported_numbers, []) AS unsupported_numbers,
       coalesce(s.refusal, false) AS refusal, s.language,
       coalesce(s.evidence_starts, []) AS evidence_starts, coalesce(s.evidence_ends, []) AS evidence_ends,
       s.evidence_score, c.source_chunk_id, c.service, c.doc_type, c.metadata_json AS metadata,
       [q.chunk_id] AS hop_chunk_ids, q.max_tokens, q.temperature
FROM qa_pairs q
JOIN chunks c USING (document, chunk_id)
LEFT JOIN pair_scores s USING (document, chunk_id, pair_index)
ORDER BY q.document, c.position, q.pair_index
"""


class ExportOptions(BaseModel):
    """What to export and which pairs to leave out."""

    formats: tuple[ExportFormat, ...] = DEFAULT_FORMATS
    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    evaluation: float = Field(0.1, ge=0, le=1)
    seed: int = 0
    split_by: str = Field(
        DOCUMENT_GROUPING,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="what a split is made of: 'document', or a metadata field of pre-chunked input (e.g. service)",
    )
    min_groundedness: float | None = Field(None, ge=0, le=1, description="drop pairs below (or without) this score")
    min_evidence: float | None = Field(
        None, ge=0, le=1, description="drop pairs whose weakest evidence quote scores below this (or who quote none)"
    )
    include_multihop: bool = Field(True, description="also the multi-hop pairs (`multihop_pairs`), if any")
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
    groups: dict[str, list[str]] = field(default_factory=dict)  # split → the grouping key's values in it
    warnings: list[str] = field(default_factory=list)


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
    for document, quality in summarize_documents(storage, documents, thresholds).items():
        verdicts = partition_verdicts(quality, thresholds)
        if any(not v.passed for v in verdicts if v.check in ("success_rate", "groundedness")):
            failing.append(document)
    return failing


def select_pairs(storage: Storage, options: ExportOptions) -> tuple[pl.DataFrame, dict[str, int]]:
    """The pairs to export (with context and scores) and how many each filter dropped."""
    refresh_pair_scores(storage)
    rows = storage.query(EXPORT_SQL)
    if options.include_multihop:
        multihop = multihop_rows(storage, rows.schema)
        rows = pl.concat([rows, multihop]).sort("document", "position", maintain_order=True)
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
    if options.min_evidence is not None:
        drop("evidence_not_in_chunk", pl.col("evidence_score").fill_null(-1.0) >= options.min_evidence)
    if options.drop_invented_numbers:
        drop("invented_numbers", pl.col("unsupported_numbers").list.len() == 0)
    if options.drop_duplicates:
        duplicates = find_duplicate_questions(rows).select("document", "chunk_id", "pair_index")
        before = rows.height
        rows = rows.join(duplicates, on=["document", "chunk_id", "pair_index"], how="anti", maintain_order="left")
        if before - rows.height:
            dropped["duplicate"] = before - rows.height
    return rows, dropped


RECORD_COLUMNS = (
    "id", "split", "document", "chunk_id", "pair_index", "question", "answer", "type", "difficulty", "context",
    "heading_path", "evidence", "evidence_starts", "evidence_ends", "evidence_score", "model", "prompt_version",
    "groundedness", "language", "source_chunk_id", "service", "doc_type", "metadata", "hop_chunk_ids",
)


def grouping_key(split_by: str) -> pl.Expr:
    """The value a row is split by: its document, or a field of its chunk's metadata (pre-chunked input),
    falling back on the document for chunks without that field."""
    if split_by == DOCUMENT_GROUPING:
        return pl.col("document")
    value = pl.col("metadata").str.json_path_match(f"$.{split_by}")
    return pl.coalesce(value, pl.col("document"))


def _split_warnings(options: ExportOptions, rows: pl.DataFrame, groups: dict[str, str]) -> list[str]:
    """A sentence for each split that has a share but no pair, saying why and what to do."""
    warnings = []
    if options.split_by != DOCUMENT_GROUPING and rows.height:
        with_field = rows.filter(pl.col("metadata").str.json_path_match(f"$.{options.split_by}").is_not_null())
        if with_field.height == 0:
            warnings.append(
                f"no exported chunk has the metadata field {options.split_by!r}: the pairs were split by document"
            )
    for split, share in options.fractions().items():
        if share > 0 and split not in groups.values():
            warnings.append(
                f"split {split!r} is empty: the {rows.height} exported pairs come from {len(groups)} group(s) "
                f"of {options.split_by!r} and a group goes to one split only. Split by a finer key "
                "(--split-by FIELD, a metadata field of pre-chunked JSONL such as service or source_file), "
                f"or set the {split} share to 0."
            )
    return warnings


def export_dataset(storage: Storage, out_dir: Path, options: ExportOptions | None = None) -> ExportSummary:
    """Writes `{split}.jsonl`, `{split}.parquet`, `{split}.chat.jsonl`, `beir/` and `hf/` (as chosen) and a
    manifest.json. Every row keeps the user's own ids (`source_chunk_id`, `service`, `doc_type`, `metadata`)."""
    options = options or ExportOptions()
    rows, dropped = select_pairs(storage, options)
    rows = rows.with_columns(group=grouping_key(options.split_by))
    groups = assign_splits(rows["group"].unique().sort().to_list(), options.fractions(), options.seed)
    rows = rows.with_columns(
        split=pl.col("group").replace_strict(groups, default=None, return_dtype=pl.String()),
        id=pl.col("chunk_id") + "-" + pl.col("pair_index").cast(pl.String()),
    )
    records = rows.select(RECORD_COLUMNS)
    summary = ExportSummary(out_dir=out_dir, rows={}, documents={}, dropped=dropped)
    summary.warnings = _split_warnings(options, rows, groups)
    for split in SPLITS:
        part = records.filter(pl.col("split") == split)
        summary.rows[split] = part.height
        summary.documents[split] = part["document"].unique().sort().to_list()
        summary.groups[split] = sorted(group for group, s in groups.items() if s == split)
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
    if "beir" in options.formats:
        summary.files += write_beir(out_dir, records, storage.query(CORPUS_SQL))
    if "hf" in options.formats:
        card = dataset_card(records, summary, options, rows.select("max_tokens", "temperature"))
        summary.files += write_hf(out_dir, records, card, "QA pairs")
    manifest = {
        "created_at": datetime.now(UTC).isoformat(),
        "options": options.model_dump(mode="json"),
        "rows": summary.rows,
        "documents": summary.documents,
        "groups": summary.groups,
        "dropped": dropped,
        "warnings": summary.warnings,
        "files": [str(path.relative_to(out_dir)) for path in summary.files],
    }
    summary.files.append(_write_text(json.dumps(manifest, indent=2) + "\n", out_dir / "manifest.json"))
    return summary


CORPUS_SQL = "SELECT * FROM chunks ORDER BY document, position"
# Between the passages of a multi-hop pair's `context`.
HOP_SEPARATOR = "\n\n"
MULTIHOP_SQL = """
SELECT m.*, c.content, c.heading_path, c.position, c.source_chunk_id, c.service, c.doc_type, c.metadata_json
FROM (SELECT *, unnest(hop_chunk_ids) AS hop_chunk_id, generate_subscripts(hop_chunk_ids, 1) AS hop FROM multihop_pairs) m
JOIN chunks c ON c.document = m.document AND c.chunk_id = m.hop_chunk_id
ORDER BY m.document, m.group_id, m.pair_index, m.hop
"""


def multihop_rows(storage: Storage, columns: dict[str, pl.DataType]) -> pl.DataFrame:
    """The multi-hop pairs as export rows (the columns of EXPORT_SQL): `chunk_id` is the group id,
    `context` the hop chunks joined by a blank line, evidence offsets moved into that context (so
    `context[start:end]` is a quote, as for single-chunk pairs), ids and metadata of the first hop."""
    hops = storage.query(MULTIHOP_SQL)
    rows = []
    for _, group in hops.group_by("document", "group_id", "pair_index", maintain_order=True):
        if group.height != group["hop_chunk_ids"][0].len():  # a hop chunk is gone: the pair is stale
            continue
        first = group.row(0, named=True)
        shift, offset = {}, 0
        for chunk_id, content in group.select("hop_chunk_id", "content").iter_rows():
            shift[chunk_id] = offset
            offset += len(content) + len(HOP_SEPARATOR)
        moved = {
            name: [None if v is None else v + shift[c] for v, c in zip(first[name], first["evidence_chunk_ids"], strict=True)]
            for name in ("evidence_starts", "evidence_ends")
        }
        rows.append({
            **{name: first.get(name) for name in columns},
            "chunk_id": first["group_id"],
            "evidence": first["evidence"],
            "context": HOP_SEPARATOR.join(group["content"].to_list()),
            "unsupported_numbers": [],
            "refusal": False,
            **moved,
            "metadata": first["metadata_json"],
        })
    return pl.DataFrame(rows, schema=columns)


def dataset_card(
    records: pl.DataFrame, summary: ExportSummary, options: ExportOptions, sampling: pl.DataFrame | None = None
) -> str:
    """The dataset card's text: what the data is, how it was made (model, prompt versions, the question
    types, `sampling`: the max_tokens and temperature of each row's request), and its quality figures
    with how they were measured."""
    evidence = records["evidence_score"]
    not_found = records.filter(pl.col("evidence_score").fill_null(0.0) < FUZZY_MIN_SCORE).height
    types = dict(records.group_by("type").len().sort("type").iter_rows())
    difficulty = dict(records.group_by(pl.col("difficulty").fill_null("(none)")).len().sort("difficulty").iter_rows())
    models = ", ".join(records["model"].unique().sort().to_list()) or "none"
    prompts = ", ".join(records["prompt_version"].unique().sort().to_list()) or "none"
    multihop = records.filter(pl.col("hop_chunk_ids").list.len() > 1).height
    sampling = sampling if sampling is not None else pl.DataFrame(schema={"max_tokens": pl.Int32, "temperature": pl.Float64})
    split_lines = "\n".join(
        f"| {HF_SPLITS[split]} | {summary.rows[split]} | {len(summary.groups[split])} |" for split in SPLITS
    )
    filters = {
        "min_groundedness": options.min_groundedness, "min_evidence": options.min_evidence,
        "drop_refusals": options.drop_refusals, "drop_invented_numbers": options.drop_invented_numbers,
        "drop_duplicates": options.drop_duplicates, "exclude_failing_documents": options.exclude_failing_documents,
    }
    return f"""# QA pairs

Question/answer pairs generated from documentation by qa_pipeline, each with the passage (`context`) it was
written from, verbatim evidence quotes from that passage and their character offsets in it.

## Splits

Split by `{options.split_by}`: every {options.split_by} is in one split only, so no passage of an evaluation
question was seen in training.

| split | pairs | groups |
|---|---|---|
{split_lines}

## How it was made

- model: {models}
- prompt version: {prompts}
- structured output: a JSON schema with one slot per question type, so every chunk gets one question of each
  type, in order; each slot asks for the question, one or more sentences quoted from the passage as
  evidence, the answer and a difficulty label (easy, medium, hard)
- question types (pairs per type): {_counts(types)}
- multi-hop pairs (type `multi_hop`, questions needing two or three chunks of a document; `hop_chunk_ids`
  names them and `context` joins them): {multihop}
- difficulty labels (the model's own): {_counts(difficulty)}
- max_tokens (pairs per value): {_setting_counts(sampling["max_tokens"])}
- temperature (pairs per value): {_setting_counts(sampling["temperature"])}; an answer the parser rejected is
  asked again once, sampling at temperature 0.7 when the configured one is 0 and with a larger max_tokens
  when it was cut, and its pairs record that request's values
- the seed of each request is part of its cache key (the journal), not stored with the pairs
- filters applied at export: {json.dumps({k: v for k, v in filters.items() if v})}
- pairs dropped by them: {json.dumps(summary.dropped)}

## Quality, and how it was measured

- evidence score (`evidence_score`): each quote is looked up in its passage, exactly, then ignoring case,
  spacing and typographic quotes, then by fuzzy alignment (rapidfuzz partial ratio); a quote counts as found
  at a score of at least {FUZZY_MIN_SCORE:g}, and a pair scores as its weakest quote (0 when it quotes
  nothing). Mean: {_mean(evidence)}; pairs whose evidence is not in their passage: {not_found} of
  {records.height}. `evidence_starts`/`evidence_ends` are character offsets into `context` (null: not found).
- groundedness (`groundedness`): the share of the answer's content words, numbers and names found in its
  passage after crude stemming; a word-overlap heuristic that cannot tell a paraphrase from an invention.
  Mean: {_mean(records["groundedness"])}.
- These are heuristics measured against the passage, not judgements of correctness.
"""


def _mean(values: pl.Series) -> str:
    mean = values.mean()
    return "n/a" if mean is None else f"{mean:.3f}"


def _setting_counts(values: pl.Series) -> str:
    """"1024 (30), 2048 (2)": each value with its number of pairs; "not recorded" for older files."""
    counts = values.drop_nulls().value_counts().sort(["count", values.name], descending=[True, False])
    recorded = ", ".join(f"{value:g} ({count})" for value, count in counts.iter_rows())
    unknown = values.null_count()
    return ", ".join(part for part in (recorded, f"not recorded ({unknown})" if unknown else "") if part) or "none"


def _counts(counts: dict) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "none"


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
