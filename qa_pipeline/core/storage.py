"""Storage, the only door to the data directory's files: tables as Parquet (written atomically), the chunk
journal, the report and plots, and DuckDB views over the tables."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import duckdb
import polars as pl
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from qa_pipeline.core.chunking import CHUNK_SCHEMA
from qa_pipeline.core.documents import FileStamp
from qa_pipeline.core.layout import MODEL_TABLES, PARTITIONED_TABLES, DataLayout, Table, safe_file_stem
from qa_pipeline.core.table_files import Compaction, TableFiles
from qa_pipeline.core.prompts import MultiHopPair, QAPair

QA_PAIRS_SCHEMA: dict[str, pl.DataType] = {
    "document": pl.String(),
    "chunk_id": pl.String(),
    "pair_index": pl.Int32(),
    "question": pl.String(),
    "answer": pl.String(),
    "type": pl.String(),
    "difficulty": pl.String(),
    # Quotes the model gave as support, as it wrote them; where they are in the chunk is in pair_scores.
    "evidence": pl.List(pl.String()),
    "model": pl.String(),
    "latency_s": pl.Float64(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "attempts": pl.Int32(),
    "endpoint": pl.String(),
    "request_hash": pl.String(),
    "prompt_version": pl.String(),
    # The sampling of the request that gave the pair (a re-ask of a rejected answer samples hotter and
    # may have a larger budget); null in files written before they were recorded.
    "max_tokens": pl.Int32(),
    "temperature": pl.Float64(),
    "generated_at": pl.Datetime("us", "UTC"),
}

FAILURES_SCHEMA: dict[str, pl.DataType] = {
    "document": pl.String(),
    "chunk_id": pl.String(),
    "reason": pl.String(),
    "detail": pl.String(),
    "http_status": pl.Int32(),
    "attempts": pl.Int32(),
    "model": pl.String(),
    "endpoint": pl.String(),
    "latency_s": pl.Float64(),
    "completion_tokens": pl.Int64(),
    "request_hash": pl.String(),
    "failed_at": pl.Datetime("us", "UTC"),
}

BENCHMARK_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "started_at": pl.Datetime("us", "UTC"),
    "model": pl.String(),
    "endpoint": pl.String(),
    "concurrency": pl.Int32(),
    "requests": pl.Int32(),
    "successes": pl.Int32(),
    "success_rate": pl.Float64(),
    "duration_s": pl.Float64(),
    "requests_per_s": pl.Float64(),
    "output_tokens_per_s": pl.Float64(),
    # The steady state of the level, without ramp-up and drain (see core.benchmark.sustained_window);
    # null rates when the level was too short to have one. The recommendation is based on these.
    "sustained_s": pl.Float64(),
    "sustained_requests_per_s": pl.Float64(),
    "sustained_output_tokens_per_s": pl.Float64(),
    "latency_p50_s": pl.Float64(),
    "latency_p95_s": pl.Float64(),
    "latency_p99_s": pl.Float64(),
    "server_running_mean": pl.Float64(),
    "server_running_max": pl.Float64(),
    "server_waiting_mean": pl.Float64(),
    "server_waiting_max": pl.Float64(),
    "kv_cache_usage_mean": pl.Float64(),
    "kv_cache_usage_max": pl.Float64(),
    "metric_samples": pl.Int32(),
    "recommended": pl.Boolean(),
}

# Heuristic quality of each QA pair, one row per `qa_pairs` row (joined on document, chunk_id, pair_index).
PAIR_SCORES_SCHEMA: dict[str, pl.DataType] = {
    "document": pl.String(),
    "chunk_id": pl.String(),
    "pair_index": pl.Int32(),
    "groundedness": pl.Float64(),
    "content_terms": pl.Int32(),
    "unsupported_numbers": pl.List(pl.String()),
    "unsupported_names": pl.List(pl.String()),
    "refusal": pl.Boolean(),
    "question_normalized": pl.String(),
    "duplicate_scope": pl.String(),
    "duplicate_of_chunk_id": pl.String(),
    "duplicate_of_pair_index": pl.Int32(),
    "duplicate_similarity": pl.Float64(),
    "question_words": pl.Int32(),
    "answer_words": pl.Int32(),
    "language": pl.String(),
    "chunk_language": pl.String(),
    # The pair's evidence quotes located in its chunk (core.evidence): character offsets into the chunk's
    # content as stored (null where a quote is not found), how each was found, and the weakest quote's
    # score (0 for a pair without quotes).
    "evidence_starts": pl.List(pl.Int32()),
    "evidence_ends": pl.List(pl.Int32()),
    "evidence_methods": pl.List(pl.String()),
    "evidence_not_found": pl.Int32(),
    "evidence_score": pl.Float64(),
    "scorer_version": pl.String(),
}

# Questions that repeat an earlier question anywhere in the dataset (written by quality_report).
QUESTION_DUPLICATES_SCHEMA: dict[str, pl.DataType] = {
    "document": pl.String(),
    "chunk_id": pl.String(),
    "pair_index": pl.Int32(),
    "duplicate_of_document": pl.String(),
    "duplicate_of_chunk_id": pl.String(),
    "duplicate_of_pair_index": pl.Int32(),
    "similarity": pl.Float64(),
    "scope": pl.String(),
}

# LLM-as-judge verdicts on a sample of pairs, one file per judged_sample run.
JUDGEMENTS_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "judged_at": pl.Datetime("us", "UTC"),
    "judge_model": pl.String(),
    "judge_endpoint": pl.String(),
    "document": pl.String(),
    "chunk_id": pl.String(),
    "pair_index": pl.Int32(),
    "rating": pl.String(),
    "hallucination": pl.Boolean(),
    "reasoning": pl.String(),
    "failure_reason": pl.String(),
    "failure_detail": pl.String(),
    "latency_s": pl.Float64(),
    "groundedness": pl.Float64(),
    "heuristic_flagged": pl.Boolean(),
}


# One row per model: `qa-pipeline compare` and the `model_comparison` asset (core/comparison.py).
COMPARISON_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String(),
    "served_model": pl.String(),
    "prompt_version": pl.String(),  # of the model's pairs (the models file's prompt_version, else the current one)
    "chunks": pl.Int64(),  # the chunks every compared model was asked about
    "success_rate": pl.Float64(),
    "failures_by_reason": pl.String(),
    "recommended_concurrency": pl.Int32(),
    "output_tokens_per_s": pl.Float64(),  # at the recommended concurrency (its benchmark)
    "chunks_per_s": pl.Float64(),
    "latency_p50_s": pl.Float64(),
    "latency_p95_s": pl.Float64(),
    "pairs": pl.Int64(),
    "accepted_pairs": pl.Int64(),  # grounded, not a refusal, not a duplicate
    "tokens_per_accepted_pair": pl.Float64(),
    "server_s_per_1000_accepted": pl.Float64(),
    "groundedness_mean": pl.Float64(),
    "groundedness_p10": pl.Float64(),
    "evidence_score_mean": pl.Float64(),  # how well its quoted evidence is found in the chunk (core.evidence)
    "refusal_share": pl.Float64(),
    "duplicate_share": pl.Float64(),
    "type_balance": pl.Float64(),
    "judged": pl.Int64(),
    "judge_a_share": pl.Float64(),
    # When the rows were computed, and a digest of the files they were computed from: `qa-pipeline sql`
    # computes them again when the digest no longer matches (core.comparison.refresh_comparison).
    "recorded_at": pl.Datetime("us", "UTC"),
    "inputs_fingerprint": pl.String(),
}


_PAIR_COLUMNS = ("pair_index", "question", "answer", "type", "difficulty", "evidence")
# Questions that need two or three chunks of one document (core/multihop.py), their evidence located in
# each hop's chunk: one row per pair, `group_id` the hop chunk ids joined by "+".
MULTIHOP_PAIRS_SCHEMA: dict[str, pl.DataType] = {
    "document": pl.String(),
    "group_id": pl.String(),
    "hop_chunk_ids": pl.List(pl.String()),
    "linked_by": pl.String(),  # "heading", "terms" or "heading+terms": why the chunks were grouped
    "shared_terms": pl.List(pl.String()),
    **{name: QA_PAIRS_SCHEMA[name] for name in _PAIR_COLUMNS},
    # Every quote in hop order, the chunk it was quoted from, and where it is in that chunk's content
    # (null where not found); a pair scores as its weakest quote, 0 when a hop has none.
    "evidence_chunk_ids": pl.List(pl.String()),
    **{name: dtype for name, dtype in PAIR_SCORES_SCHEMA.items() if name.startswith("evidence_")},
    # The request's figures, as in qa_pairs.
    **{name: dtype for name, dtype in QA_PAIRS_SCHEMA.items() if name not in ("document", "chunk_id", *_PAIR_COLUMNS)},
}


# Every table's columns, by table: the views, the writers and the readers use these.
TABLE_SCHEMAS: dict[Table, dict[str, pl.DataType]] = {
    Table.CHUNKS: CHUNK_SCHEMA,
    Table.QA_PAIRS: QA_PAIRS_SCHEMA,
    Table.FAILURES: FAILURES_SCHEMA,
    Table.BENCHMARK_RUNS: BENCHMARK_SCHEMA,
    Table.PAIR_SCORES: PAIR_SCORES_SCHEMA,
    Table.QUESTION_DUPLICATES: QUESTION_DUPLICATES_SCHEMA,
    Table.JUDGEMENTS: JUDGEMENTS_SCHEMA,
    Table.MODEL_COMPARISON: COMPARISON_SCHEMA,
    Table.MULTIHOP_PAIRS: MULTIHOP_PAIRS_SCHEMA,
    Table.MULTIHOP_FAILURES: FAILURES_SCHEMA,
}


class ChunkResult(BaseModel):
    """The durable record of one finished chunk: its QA pairs or why it has none."""

    document: str
    chunk_id: str
    request_hash: str
    ok: bool
    # A multi-hop answer's pair keeps its quotes per hop (validated as MultiHopPair when it has them).
    pairs: list[MultiHopPair | QAPair] = Field(default_factory=list)
    reason: str | None = None
    detail: str | None = None
    http_status: int | None = None
    attempts: int = 0
    model: str = ""
    endpoint: str = ""
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_version: str = ""
    finished_at: datetime
    max_tokens_used: int | None = None  # the max_tokens of the request that gave this result
    temperature: float | None = None  # the temperature of the request that gave this result


class StorageFullError(OSError):
    """Writing into the data directory failed (a full disk, a quota, a read-only mount); nothing more
    can be saved, so a run must stop sending. The message names the file, the free space and the fix."""

    @classmethod
    def writing(cls, path: Path, error: OSError) -> StorageFullError:
        """The error for `error`, met while writing `path`."""
        problem = _FULL_ERRNOS.get(error.errno or 0) or error.strerror or str(error)
        free = _free_bytes(path)
        free_text = "free space unknown" if free is None else f"{format_bytes(free)} free on that file system"
        message = (
            f"cannot write {path}: {problem} ({free_text}). Free space or point QA_PIPELINE_DATA_DIR "
            "elsewhere; finished chunks are saved; re-run resumes."
        )
        return cls(error.errno or errno.EIO, message, str(path))

    def __str__(self) -> str:
        return self.strerror or super().__str__()


_FULL_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
}


def _free_bytes(path: Path) -> int | None:
    """Free bytes of the file system holding `path` (or its nearest existing parent)."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def format_bytes(size: float) -> str:
    """A size for people: "512 bytes", "3.4 MB"."""
    units, power = ("bytes", "KB", "MB", "GB", "TB"), 0
    while size >= 1024 and power < len(units) - 1:
        size, power = size / 1024, power + 1
    return f"{size:.0f} bytes" if power == 0 else f"{size:.1f} {units[power]}"


def _write_bytes_atomic(data: bytes, path: Path) -> None:
    """Readers see the old file or the new one, never half of one; a failed write leaves no temporary file."""
    _write_atomic(lambda handle: handle.write(data), path)


def _write_atomic(write: Callable[[BinaryIO], object], path: Path) -> None:
    """`write(handle)` fills a temporary file that then replaces `path` (see `_write_bytes_atomic`)."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise StorageFullError.writing(path, error) from error
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet_atomic(frame: pl.DataFrame, path: Path, row_group_size: int | None = None) -> None:
    """Readers see the old file or the new one, never half of one; a failed write raises StorageFullError."""
    # Encoded in memory first: polars reports a failed file write as a ComputeError, not an OSError.
    buffer = io.BytesIO()
    frame.write_parquet(buffer, row_group_size=row_group_size)
    _write_bytes_atomic(buffer.getvalue(), path)


def write_text_atomic(text: str, path: Path) -> None:
    _write_bytes_atomic(text.encode("utf-8"), path)


_STAMPS_SCHEMA: dict[str, pl.DataType] = {
    "key": pl.String(),
    "size": pl.Int64(),
    "mtime_ns": pl.Int64(),
    "ctime_ns": pl.Int64(),
    "inode": pl.UInt64(),
    "content_hash": pl.String(),
}


def read_source_stamps(path: Path) -> dict[str, FileStamp]:
    """The recorded stamps of the source files (see `DataLayout.discover_sources`); none when the file is
    missing or unreadable: it is a cache, and every file is then hashed again."""
    try:
        frame = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError):
        return {}
    return {
        key: FileStamp(size, mtime_ns, ctime_ns, inode, content_hash)
        for key, size, mtime_ns, ctime_ns, inode, content_hash in frame.iter_rows()
    }


def write_source_stamps(stamps: dict[str, FileStamp], path: Path) -> None:
    rows = [(key, s.size, s.mtime_ns, s.ctime_ns, s.inode, s.content_hash) for key, s in stamps.items()]
    try:
        write_parquet_atomic(pl.DataFrame(rows, schema=_STAMPS_SCHEMA, orient="row"), path)
    except StorageFullError:
        pass  # a cache: the next discovery hashes the files again


@dataclass(frozen=True, slots=True)  # one per chunk of a document: kept small
class JournalEntry:
    """Where one request's result is in a journal, and what `publish_document` needs to know before reading it."""

    ok: bool
    offset: int
    chunk_id: str


class Journal:
    """Append-only JSONL of finished chunks for one document, flushed per line so a killed run resumes.

    Entries are keyed by request hash (model, messages, sampling parameters, schema), which also
    makes the journal the response cache: an unchanged chunk costs no request on a re-run.
    """

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        self._entered = False
        # Lines in the file, counted by load() and kept up by append(); None until load() has run.
        self.lines: int | None = None

    def load(self) -> dict[str, ChunkResult]:
        """Latest result per request hash; a line cut short by a crash is skipped."""
        results: dict[str, ChunkResult] = {}
        self.lines = 0
        if not self.path.exists():
            return results
        with self.path.open("r", encoding="utf-8") as handle:
            for line in handle:
                self.lines += 1
                try:
                    result = ChunkResult.model_validate_json(line)
                except ValueError:
                    continue
                previous = results.get(result.request_hash)
                # A success is never replaced by a later failure of the same request.
                if previous is None or result.ok or not previous.ok:
                    results[result.request_hash] = result
        return results

    def index(self) -> dict[str, JournalEntry]:
        """Where the latest result of each request hash is (as `load` picks it), without keeping the
        results: a document's journal is read back one line at a time (`read_at`) when it is published."""
        entries: dict[str, JournalEntry] = {}
        self.lines = 0
        if not self.path.exists():
            return entries
        with self.path.open("rb") as handle:
            offset = 0
            for line in handle:
                self.lines += 1
                try:
                    result = ChunkResult.model_validate_json(line)
                except ValueError:
                    offset += len(line)
                    continue
                previous = entries.get(result.request_hash)
                if previous is None or result.ok or not previous.ok:
                    entries[result.request_hash] = JournalEntry(result.ok, offset, result.chunk_id)
                offset += len(line)
        return entries

    def read_at(self, offset: int) -> ChunkResult | None:
        """The result on the line starting at byte `offset` (from `index`, `append` or `rewrite`); None
        when that line is not a whole record (the file was rewritten since)."""
        with self.path.open("rb") as handle:
            handle.seek(offset)
            line = handle.readline()
        try:
            return ChunkResult.model_validate_json(line)
        except ValueError:
            return None

    def __enter__(self) -> Journal:
        # The file is opened by the first append: a run that saves nothing (all cached, a full disk,
        # stopped before the first answer) leaves no empty journal behind.
        self._entered = True
        return self

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_cut_line()
            self._handle = self.path.open("ab")
        except OSError as error:
            raise StorageFullError.writing(self.path, error) from error

    def _drop_cut_line(self) -> None:
        """A last line cut short by a crash (or a full disk) holds no finished chunk; left in place, the
        next append would be glued to it and lost too, so it is cut off before appending."""
        if not self.path.exists():
            return
        with self.path.open("rb+") as handle:
            end = handle.seek(0, os.SEEK_END)
            position = end
            while position > 0:
                start = max(0, position - (1 << 16))
                handle.seek(start)
                newline = handle.read(position - start).rfind(b"\n")
                if newline != -1:
                    if start + newline + 1 < end:
                        handle.truncate(start + newline + 1)
                    return
                position = start
            handle.truncate(0)

    def __exit__(self, *exc_info) -> None:
        self._entered = False
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
            except OSError as error:
                _close_quietly(handle)
                raise StorageFullError.writing(self.path, error) from error

    def append(self, result: ChunkResult) -> int:
        """Adds one finished chunk and returns the byte offset of its line; raises StorageFullError when it
        cannot be written (the chunk is then not saved, and any part of its line that reached the file is
        cut off by the next append)."""
        # One write per line plus flush: the OS has it even if this process is SIGKILLed.
        assert self._entered, "Journal.append outside `with`"
        if self._handle is None:
            self._open()
        try:
            offset = self._handle.tell()
            self._handle.write(result.model_dump_json().encode("utf-8") + b"\n")
            self._handle.flush()
        except OSError as error:
            # The unwritten rest of the line is dropped with the handle, so it cannot be written later
            # behind another line; the next append reopens the file.
            _close_quietly(self._handle)
            self._handle = None
            raise StorageFullError.writing(self.path, error) from error
        if self.lines is not None:
            self.lines += 1
        return offset

    def rewrite(self, results: Iterable[ChunkResult]) -> list[int]:
        """Keep only the given results (the document's current chunks), replacing the file atomically;
        the byte offset of each one's line. Written as they come, so a large document is never whole in memory."""
        offsets: list[int] = []

        def write(handle) -> None:
            for result in results:
                offsets.append(handle.tell())
                handle.write(result.model_dump_json().encode("utf-8") + b"\n")

        _write_atomic(write, self.path)
        self.lines = len(offsets)
        return offsets


def _move(path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)


def _close_quietly(handle) -> None:
    """Closes a handle whose buffered data cannot be written; that data is given up."""
    try:
        handle.close()
    except OSError:
        pass


def journal_space_needed(journals: Iterable[Journal], chunks_left: int) -> int | None:
    """Roughly the bytes a run still needs for its journals: the lines to come (the average line so far
    times the chunks left) and, at the end, room for compaction's temporary copy of each journal.
    The journals must have been loaded; None before any of them has a line."""
    size = lines = 0
    for journal in journals:
        if journal.lines:
            size += journal.path.stat().st_size if journal.path.exists() else 0
            lines += journal.lines
    if not lines:
        return None
    to_come = size * chunks_left // lines
    return size + 2 * to_come


def results_to_frames(results: Iterable[ChunkResult]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The `qa_pairs` and `failures` rows of finished chunks."""
    pair_rows: list[dict] = []
    failure_rows: list[dict] = []
    for r in results:
        if r.ok:
            for index, pair in enumerate(r.pairs):
                pair_rows.append(
                    {
                        "document": r.document,
                        "chunk_id": r.chunk_id,
                        "pair_index": index,
                        "question": pair.question,
                        "answer": pair.answer,
                        "type": pair.type,
                        "difficulty": pair.difficulty,
                        "evidence": pair.evidence,
                        "model": r.model,
                        "latency_s": r.latency_s,
                        "prompt_tokens": r.prompt_tokens,
                        "completion_tokens": r.completion_tokens,
                        "attempts": r.attempts,
                        "endpoint": r.endpoint,
                        "request_hash": r.request_hash,
                        "prompt_version": r.prompt_version,
                        "max_tokens": r.max_tokens_used,
                        "temperature": r.temperature,
                        "generated_at": r.finished_at,
                    }
                )
        else:
            failure_rows.append(
                {
                    "document": r.document,
                    "chunk_id": r.chunk_id,
                    "reason": r.reason,
                    "detail": r.detail,
                    "http_status": r.http_status,
                    "attempts": r.attempts,
                    "model": r.model,
                    "endpoint": r.endpoint,
                    "latency_s": r.latency_s,
                    "completion_tokens": r.completion_tokens,
                    "request_hash": r.request_hash,
                    "failed_at": r.finished_at,
                }
            )
    return (
        pl.DataFrame(pair_rows, schema=QA_PAIRS_SCHEMA),
        pl.DataFrame(failure_rows, schema=FAILURES_SCHEMA),
    )


@dataclass(frozen=True)
class ResultTables:
    """Where one kind of journaled result is published: its pairs and failures tables (and scores, for
    `qa_pairs`), which requests a document currently has, and how results become rows."""

    pairs: Table
    failures: Table
    # The document's current request ids (chunk ids, or multi-hop group ids), in order, from its chunks.
    current_ids: Callable[[pl.DataFrame], list[str]]
    # The pairs and failures rows of the selected results; the document's chunks are at hand.
    frames: Callable[[list[ChunkResult], pl.DataFrame], tuple[pl.DataFrame, pl.DataFrame]]
    scores: Table | None = None


QA_TABLES = ResultTables(
    Table.QA_PAIRS,
    Table.FAILURES,
    current_ids=lambda chunks: chunks.sort("position")["chunk_id"].to_list(),
    frames=lambda selected, chunks: results_to_frames(selected),
    scores=Table.PAIR_SCORES,
)


@dataclass(frozen=True)
class PublishedDocument:
    """One document's tables as `Storage.publish_document` wrote them: its figures and checks read these.

    For `qa_pairs` the frames hold the columns the checks read (every `failures` column), not whole
    tables: a large document's rows are on disk, written in batches.
    """

    document: str
    chunks: pl.DataFrame  # qa_pairs: chunk_id, position
    pairs: pl.DataFrame  # qa_pairs: PUBLISHED_PAIR_COLUMNS
    failures: pl.DataFrame
    scores: pl.DataFrame  # qa_pairs: PUBLISHED_SCORE_COLUMNS
    answered: int  # current chunks with a result (pairs or a failure)
    changed: bool = True  # False: every table already held exactly these rows (nothing was written)

    @property
    def failure_rate(self) -> float:
        return self.failures.height / self.answered if self.answered else 0.0


PUBLISHED_PAIR_COLUMNS = ("document", "chunk_id", "pair_index", "type", "question")
PUBLISHED_SCORE_COLUMNS = (
    "document", "chunk_id", "pair_index", "groundedness", "unsupported_numbers", "refusal", "duplicate_scope",
    "evidence_score", "evidence_methods", "scorer_version",
)
# Chunks a document is published in at a time (its results read, written and scored): memory holds one
# batch's rows, whatever the document's size.
PUBLISH_BATCH_CHUNKS = 2000


class ResultsInChunkOrder(Sequence[ChunkResult]):
    """Results that are one per chunk already, the chosen one (the generator's `DocumentResults`): `chunk_ids`
    names them in order without reading them, so publishing reads each result once instead of twice."""

    chunk_ids: Sequence[str]


def best_result_by_chunk(results: Iterable[ChunkResult]) -> dict[str, int]:
    """Per chunk id the index in `results` of its newest result with QA pairs, else of its newest failure."""
    best: dict[str, tuple[bool, datetime, int]] = {}
    for index, result in enumerate(results):
        current = best.get(result.chunk_id)
        if current is None or (result.ok, result.finished_at) > current[:2]:
            best[result.chunk_id] = (result.ok, result.finished_at, index)
    return {chunk_id: index for chunk_id, (_, _, index) in best.items()}


def best_results(results: Iterable[ChunkResult], chunk_order: Sequence[str]) -> list[ChunkResult]:
    """Per chunk of `chunk_order` (the document's current chunks, in order) its newest result with QA
    pairs, else its newest failure (see `best_result_by_chunk`); results of chunks no longer in the
    document are left out."""
    results = results if isinstance(results, Sequence) else list(results)
    best = best_result_by_chunk(results)
    return [results[best[chunk_id]] for chunk_id in chunk_order if chunk_id in best]


class _RowReader:
    """A Parquet file's rows (or a frame's), taken `n` at a time in file order, one record batch after another."""

    def __init__(self, source: Path | pl.DataFrame):
        if isinstance(source, pl.DataFrame):  # rows already read (a compacted segment's)
            self._batches = iter(source.to_arrow().to_batches())
        else:
            self._batches = pq.ParquetFile(source).iter_batches(batch_size=PUBLISH_BATCH_CHUNKS)
        self._buffer: pl.DataFrame | None = None

    def take(self, rows: int) -> pl.DataFrame:
        parts, wanted = [], rows
        while wanted > 0:
            if self._buffer is None or self._buffer.height == 0:
                batch = next(self._batches, None)
                if batch is None:
                    break
                self._buffer = pl.from_arrow(batch)
            parts.append(self._buffer.head(wanted))
            self._buffer = self._buffer.slice(wanted)
            wanted -= parts[-1].height
        return pl.concat(parts) if parts else pl.DataFrame()


class _ParquetBatches:
    """A Parquet file written one frame at a time into a temporary file, which `Storage._install` puts in
    place (or drops); a failed write raises StorageFullError naming the table's file."""

    def __init__(self, path: Path, schema: dict[str, pl.DataType]):
        self.path = path  # the file it will replace
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self._schema = pl.DataFrame(schema=schema).to_arrow().schema
        self._writer: pq.ParquetWriter | None = None

    def write(self, frame: pl.DataFrame) -> None:
        try:
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.tmp, self._schema, compression="zstd")
            self._writer.write_table(frame.to_arrow().cast(self._schema))
        except OSError as error:
            self.discard()
            raise StorageFullError.writing(self.path, error) from error

    def close(self) -> None:
        """Flushes the file to disk; after `close`, the temporary file holds every row written."""
        try:
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.tmp, self._schema, compression="zstd")
                self._writer.write_table(self._schema.empty_table())
            self._writer.close()
            with self.tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
        except OSError as error:
            self.discard()
            raise StorageFullError.writing(self.path, error) from error

    def discard(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> _ParquetBatches:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.discard()


# Per-document files written or deleted since the last compaction, above which the report compacts a table.
COMPACT_AFTER_DOCUMENTS = 200


class Storage:
    """Reads and writes every table and file of one data directory."""

    def __init__(self, layout: DataLayout, batch_chunks: int = PUBLISH_BATCH_CHUNKS):
        self.layout = layout
        self.batch_chunks = batch_chunks  # chunks a document is published in at a time
        self._table_files: dict[str, TableFiles] = {}

    def publish_document(
        self, document: str, results: Iterable[ChunkResult], tables: ResultTables = QA_TABLES
    ) -> PublishedDocument:
        """Writes a document's `qa_pairs`, `failures` and `pair_scores` (or another kind's `tables`) from
        the results of its requests (the generator's or a journal's: `best_results` picks one per current
        chunk or group) and returns what its checks read.

        The one way a document's answers reach its tables, for `qa_pairs` and `multihop_pairs` runs and
        `import-batch` alike. `qa_pairs` are published `batch_chunks` chunks at a time, so memory does not
        grow with the document: its results are read (a `DocumentResults` reads them from the journal),
        written and scored batch by batch; only duplicate questions are looked for over the whole
        document at once, in its questions. Other kinds are published from whole frames.
        """
        from qa_pipeline.core.quality import score_pairs, scores_are_current  # quality reads through Storage

        if tables is QA_TABLES:
            return self._publish_in_batches(document, results)
        chunks = self.read_partition(Table.CHUNKS, document)
        if chunks is None:
            chunks = pl.DataFrame(schema=CHUNK_SCHEMA)
        selected = best_results(results, tables.current_ids(chunks))
        pairs, failures = tables.frames(selected, chunks)
        # An unchanged document (answers from the cache, as in a run spanning edited neighbours) keeps its
        # files, and its scores unless the scorer changed. pair_scores last: a scores file older than its
        # qa_pairs file means "score again" (refresh_pair_scores).
        written = self.write_partition_if_changed(tables.pairs, document, pairs)
        written = self.write_partition_if_changed(tables.failures, document, failures) or written
        if tables.scores is None:  # the pairs carry their own evidence scores
            return PublishedDocument(document, chunks, pairs, failures, pairs, answered=len(selected))
        scores = None if written else self.read_partition(Table.PAIR_SCORES, document)
        if not scores_are_current(scores, pairs):
            scores = score_pairs(pairs, chunks)
            self.write_partition(Table.PAIR_SCORES, document, scores)
            written = True
        return PublishedDocument(document, chunks, pairs, failures, scores, answered=len(selected), changed=written)

    def _publish_in_batches(self, document: str, results: Iterable[ChunkResult]) -> PublishedDocument:
        """`publish_document` for `qa_pairs`, `batch_chunks` chunks at a time."""
        from qa_pipeline.core.quality import scores_are_current  # quality reads through Storage

        results = results if isinstance(results, Sequence) else list(results)
        chunks = self.read_partition(Table.CHUNKS, document, columns=["chunk_id", "position"])
        if chunks is None:
            chunks = pl.DataFrame(schema={"chunk_id": CHUNK_SCHEMA["chunk_id"], "position": CHUNK_SCHEMA["position"]})
        chunks = chunks.sort("position")
        order = chunks["chunk_id"].to_list()
        in_order = isinstance(results, ResultsInChunkOrder) and list(results.chunk_ids) == order
        best = {} if in_order else best_result_by_chunk(results)
        pairs_out = _ParquetBatches(self.layout.partition_file(Table.QA_PAIRS, document), QA_PAIRS_SCHEMA)
        failures_out = _ParquetBatches(self.layout.partition_file(Table.FAILURES, document), FAILURES_SCHEMA)
        lean_pairs, failure_parts, pairs_per_batch = [], [], []
        with pairs_out, failures_out:
            # Batches of the document's chunks, as `_score_in_batches` reads them back.
            for start in range(0, len(order), self.batch_chunks):
                if in_order:
                    selected = (results[i] for i in range(start, min(start + self.batch_chunks, len(order))))
                else:
                    batch = order[start : start + self.batch_chunks]
                    selected = (results[best[chunk_id]] for chunk_id in batch if chunk_id in best)
                pairs, failures = results_to_frames(selected)
                pairs_out.write(pairs)
                failures_out.write(failures)
                lean_pairs.append(pairs.select(PUBLISHED_PAIR_COLUMNS))
                failure_parts.append(failures)
                pairs_per_batch.append(pairs.height)
            pairs_out.close()
            failures_out.close()
        no_pairs = pl.DataFrame(schema=QA_PAIRS_SCHEMA).select(PUBLISHED_PAIR_COLUMNS)
        pairs = pl.concat(lean_pairs) if lean_pairs else no_pairs
        failures = pl.concat(failure_parts) if failure_parts else pl.DataFrame(schema=FAILURES_SCHEMA)
        # An unchanged document (answers from the cache, as in a run spanning edited neighbours) keeps its
        # files, and its scores unless the scorer changed. pair_scores last: a scores file older than its
        # qa_pairs file means "score again" (refresh_pair_scores).
        written = self._install_if_changed(Table.QA_PAIRS, document, pairs_out)
        written = self._install_if_changed(Table.FAILURES, document, failures_out) or written
        scores = None
        if not written:
            with contextlib.suppress(pl.exceptions.ColumnNotFoundError):  # written by an earlier scorer
                scores = self.read_partition(Table.PAIR_SCORES, document, columns=PUBLISHED_SCORE_COLUMNS)
        if not scores_are_current(scores, pairs):
            scores = self._score_in_batches(document, pairs, pairs_per_batch)
            written = True
        answered = len(order) if in_order else sum(chunk_id in best for chunk_id in order)
        return PublishedDocument(document, chunks, pairs, failures, scores, answered=answered, changed=written)

    def write_partition_batches(
        self, table: str, document: str, frames: Iterable[pl.DataFrame], schema: dict[str, pl.DataType]
    ) -> bool:
        """Writes a document's table from frames that come one at a time (one row group each), unless the
        file already holds exactly these rows; whether it wrote. Memory holds one frame, not the table."""
        with _ParquetBatches(self.layout.partition_file(table, document), schema) as out:
            for frame in frames:
                out.write(frame)
            out.close()
        return self._install_if_changed(table, document, out)

    def _score_in_batches(self, document: str, pairs: pl.DataFrame, pairs_per_batch: list[int]) -> pl.DataFrame:
        """Scores the document's written `qa_pairs` against its chunks, batch by batch as they were published,
        and writes its `pair_scores`; the columns its checks read."""
        from qa_pipeline.core.quality import find_duplicate_questions, score_pairs

        duplicates = find_duplicate_questions(pairs)  # over the whole document, as one frame would be
        chunk_batches = self.partition_batches(Table.CHUNKS, document, self.batch_chunks, sort_by="position")
        pairs_file = self.layout.partition_file(Table.QA_PAIRS, document)
        pair_rows = _RowReader(pairs_file if pairs_file.exists() else self.read_partition(Table.QA_PAIRS, document))
        lean = []
        with _ParquetBatches(self.layout.partition_file(Table.PAIR_SCORES, document), PAIR_SCORES_SCHEMA) as out:
            for count in pairs_per_batch:
                chunks = next(chunk_batches)
                if not count:
                    continue
                scores = score_pairs(pair_rows.take(count), chunks, duplicates=duplicates)
                out.write(scores)
                lean.append(scores.select(PUBLISHED_SCORE_COLUMNS))
            out.close()
        self._install(Table.PAIR_SCORES, out)
        return pl.concat(lean) if lean else pl.DataFrame(schema=PAIR_SCORES_SCHEMA).select(PUBLISHED_SCORE_COLUMNS)

    def partition_batches(
        self, table: str, document: str, rows: int, sort_by: str | None = None
    ) -> Iterator[pl.DataFrame]:
        """A partition's rows `rows` at a time, in file order (which must be `sort_by`'s order, as for the
        chunks tables this pipeline writes; a file in another order is read whole and sorted)."""
        path = self.layout.partition_file(table, document)
        if path.exists():
            if sort_by is not None:
                order = pl.read_parquet(path, columns=[sort_by])[sort_by]
                if not order.is_sorted():
                    yield from pl.read_parquet(path).sort(sort_by).iter_slices(rows)
                    return
            reader = _RowReader(path)
            while (batch := reader.take(rows)).height:
                yield batch
            return
        frame = self.read_partition(table, document)
        if frame is not None:
            yield from (frame.sort(sort_by) if sort_by else frame).iter_slices(rows)

    def _install(self, table: str, written: _ParquetBatches) -> None:
        files = self._files(table)
        try:
            with files.writing() if files else contextlib.nullcontext():
                os.replace(written.tmp, written.path)
        except OSError as error:
            written.discard()
            raise StorageFullError.writing(written.path, error) from error

    def _install_if_changed(self, table: str, document: str, written: _ParquetBatches) -> bool:
        """Puts a written file in place unless the partition already holds exactly its rows; whether it did."""
        if self._holds_rows_of(table, document, written.tmp):
            written.discard()
            return False
        self._install(table, written)
        return True

    def _holds_rows_of(self, table: str, document: str, new: Path) -> bool:
        """Whether the partition's rows (its file, or its rows in a compacted segment) equal the file `new`'s,
        compared a batch at a time."""
        path = self.layout.partition_file(table, document)
        if path.exists():
            if pl.read_parquet_schema(path) != pl.read_parquet_schema(new):
                return False
            if pq.ParquetFile(path).metadata.num_rows != pq.ParquetFile(new).metadata.num_rows:
                return False
            old_rows, new_rows = _RowReader(path), _RowReader(new)
            while (batch := new_rows.take(PUBLISH_BATCH_CHUNKS)).height:
                if not old_rows.take(PUBLISH_BATCH_CHUNKS).equals(batch):
                    return False
            return True
        current = self.read_partition(table, document)
        if current is None:
            return False
        frame = pl.read_parquet(new)
        return current.schema == frame.schema and current.equals(frame)

    def write_test_sample(self, sample: pl.DataFrame) -> Path:
        write_parquet_atomic(sample, self.layout.test_sample_file)
        return self.layout.test_sample_file

    def read_test_sample(self) -> pl.DataFrame:
        path = self.layout.test_sample_file
        if not path.exists():
            raise FileNotFoundError(f"no test sample at {path}: materialize `test_sample` first")
        return pl.read_parquet(path)

    def write_report(self, markdown: str) -> Path:
        path = self.layout.report_dir / "quality_report.md"
        write_text_atomic(markdown, path)
        return path

    def write_plot(self, name: str, png: bytes) -> Path:
        """A PNG under the reports folder (`name` may hold a sub-folder, e.g. "runs/qa_pairs-ID.png")."""
        path = self.layout.report_dir / name
        _write_bytes_atomic(png, path)
        return path

    def _files(self, table: str) -> TableFiles | None:
        """The file set of a document table (None for the others, one plain file per partition)."""
        if table not in PARTITIONED_TABLES:
            return None
        if table not in self._table_files:
            self._table_files[table] = TableFiles(self.layout.table_dir(table), table)
        return self._table_files[table]

    def write_partition(self, table: str, document: str, frame: pl.DataFrame) -> Path:
        path = self.layout.partition_file(table, document)
        files = self._files(table)
        with files.writing() if files else contextlib.nullcontext():
            write_parquet_atomic(frame, path)
        return path

    def write_partition_if_changed(self, table: str, document: str, frame: pl.DataFrame) -> bool:
        """Writes a document's table unless the file already holds exactly these rows; whether it wrote.

        A run that spans unchanged documents then leaves their files (and everything read from them)
        as they were, instead of rewriting and rescoring them.
        """
        current = self.read_partition(table, document)
        if current is not None and current.schema == frame.schema and current.equals(frame):
            return False
        self.write_partition(table, document, frame)
        return True

    def read_partition(self, table: str, document: str, columns: Sequence[str] | None = None) -> pl.DataFrame | None:
        """A partition's rows (only `columns`, if given): its own file, else (document tables) its rows in a
        compacted segment; None when it has neither or was deleted."""
        path = self.layout.partition_file(table, document)
        try:
            return pl.read_parquet(path, columns=None if columns is None else list(columns))
        except FileNotFoundError:
            pass  # not written, or folded into a segment by a compaction since
        files = self._files(table)
        stem = safe_file_stem(document)
        if files is None or files.is_deleted(stem):
            return None
        rows = files.compacted_rows(stem)
        return rows if rows is None or columns is None else rows.select(columns)

    def written_times(self, table: str, documents: Iterable[str]) -> dict[str, int]:
        """document → when its rows in a document table were written (ns since the epoch), whether they are
        its own file or compacted; documents with neither are left out."""
        stems = {safe_file_stem(document): document for document in documents}
        return {stems[stem]: ns for stem, ns in self._files(table).written_times(stems).items()}

    def delete_partition(self, document: str, trash: Path | None = None) -> Path | None:
        """Moves every output and the journal of a document into a trash folder (`trash`, else a new one).

        Its rows leave the views at once, but the journal holds paid responses: moving the folder's
        contents back into the data directory restores them (rows that were in a compacted segment
        are written there as the document's own file). Returns the trash folder, or None when the
        document had no file.
        """
        trash_of = lambda: trash or self.new_trash_folder()  # noqa: E731
        stem, moved = safe_file_stem(document), False
        for storage, table in self._document_tables():
            files = storage._files(table)
            path = storage.layout.partition_file(table, document)
            if not files.directory.is_dir():
                continue
            with files.writing():
                compacted = None if files.is_deleted(stem) else files.compacted_rows(stem)
                if path.exists():
                    trash = trash_of()
                    _move(path, trash / path.relative_to(self.layout.root))
                    moved = True
                elif compacted is not None:
                    trash = trash_of()
                    write_parquet_atomic(compacted, trash / path.relative_to(self.layout.root))
                    moved = True
                # Checked after the move: a compaction that read the file before it moved created the
                # folder first, so the marker keeps the document out of the segment it is writing.
                if files.compacted_dir.exists():
                    _write_bytes_atomic(document.encode("utf-8"), files.deleted_marker(stem))
        journals = (
            storage.layout.journal_file(document, table)
            for storage in self._model_storages()
            for table in (Table.QA_PAIRS, Table.MULTIHOP_PAIRS)
        )
        for journal in dict.fromkeys(journals):
            if journal.exists():
                trash = trash_of()
                _move(journal, trash / journal.relative_to(self.layout.root))
                moved = True
        return trash if moved else None

    def _model_storages(self) -> list[Storage]:
        """This storage and, seen from the default generator's layout, one per named model with outputs."""
        if self.layout.model is not None:
            return [self]
        return [self, *(Storage(self.layout.for_model(model)) for model in self.layout.named_models())]

    def _document_tables(self) -> list[tuple[Storage, Table]]:
        """Each folder of a document table once: the shared ones, and each named model's own."""
        return [
            (storage, table)
            for storage in self._model_storages()
            for table in PARTITIONED_TABLES
            if storage is self or table in MODEL_TABLES
        ]

    def compact(self, min_documents: int = 1) -> list[Compaction]:
        """Folds the per-document files of every document table (each named model's too) into compacted
        segments, for each table with at least `min_documents` written or deleted since its last compaction."""
        done = [storage._files(table).compact(min_documents) for storage, table in self._document_tables()]
        return [compaction for compaction in done if compaction is not None]

    def new_trash_folder(self) -> Path:
        """An empty folder `trash/<UTC time>` for one deletion, never shared with an earlier one."""
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
        folder, attempt = self.layout.trash_dir / stamp, 0
        while True:
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                attempt += 1
                folder = self.layout.trash_dir / f"{stamp}-{attempt}"

    def partition_files(self, table: str) -> list[Path]:
        directory = self.layout.table_dir(table)
        return sorted(directory.glob("*.parquet")) if directory.exists() else []

    def read_table(self, table: str) -> pl.DataFrame:
        return self.query(f"SELECT * FROM {table}")

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with the views; it reads Parquet only, so it never locks the pipeline out."""
        connection = duckdb.connect(":memory:")
        for name, sql in self.view_definitions().items():
            connection.execute(f"CREATE VIEW {name} AS {sql}")
        return connection

    def view_definitions(self) -> dict[str, str]:
        """`CREATE VIEW name AS <sql>` bodies, also written to views.sql for the DuckDB CLI."""
        return {str(table): self._view_sql(table, schema) for table, schema in TABLE_SCHEMAS.items()}

    def _view_sql(self, table: str, schema: dict[str, pl.DataType]) -> str:
        # The table's columns, typed, without rows: the view has them from the start, and files written
        # before a column existed (evidence, difficulty) read as NULL in it instead of lacking it.
        empty = pl.DataFrame(schema=schema)
        columns = ", ".join(
            f"CAST(NULL AS {_duckdb_type(dtype)}) AS {name}" for name, dtype in empty.schema.items()
        )
        files = self._files(table)
        data = files.view_sql() if files is not None else None
        if files is None and self.partition_files(table):
            pattern = str(self.layout.table_dir(table) / "*.parquet").replace("'", "''")
            data = f"SELECT * FROM read_parquet('{pattern}', union_by_name = true)"
        if data is not None:
            return f"{data} UNION ALL BY NAME SELECT {columns} WHERE false"
        return f"SELECT {columns} WHERE false"

    def query(self, sql: str) -> pl.DataFrame:
        try:
            with self.connect() as connection:
                return connection.sql(sql).pl()
        except duckdb.IOException:
            # A file listed by the views was folded into a segment (or deleted) meanwhile: list again.
            with self.connect() as connection:
                return connection.sql(sql).pl()


def _duckdb_type(dtype: pl.DataType) -> str:
    mapping = {
        pl.String: "VARCHAR",
        pl.Int32: "INTEGER",
        pl.Int64: "BIGINT",
        pl.Float64: "DOUBLE",
        pl.Boolean: "BOOLEAN",
    }
    if isinstance(dtype, pl.Datetime):
        return "TIMESTAMPTZ"
    if isinstance(dtype, pl.List):
        return f"{_duckdb_type(dtype.inner)}[]"
    for polars_type, sql_type in mapping.items():
        if isinstance(dtype, polars_type):
            return sql_type
    raise TypeError(f"no DuckDB type for {dtype}")

