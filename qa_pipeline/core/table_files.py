"""The files of one document table: a Parquet file per recently written document, compacted into a few
large sorted segments, and the DuckDB view over both.

A document's newest rows are its own file (`<stem>.parquet`), so writing or replacing a document
costs one small file whatever the size of the dataset. Compaction folds those files into a segment
(`compacted/<id>.parquet`, sorted by document) and records which document went where in
`compacted/manifest.parquet`; the view reads the segments, minus the documents that have a newer
file or were deleted since (`<stem>.deleted`), plus the per-document files. Readers never wait:
files are replaced atomically, and a compaction only deletes what it has folded in, under a file
lock that writers take for the instant of their rename. No DuckDB database file exists, so no
process holds a DuckDB write lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

_PART_SUFFIX = ".parquet"
_DELETED_SUFFIX = ".deleted"
_MANIFEST = "manifest.parquet"
# written_ns: the modification time of the document's file when it was folded in, so that "written
# before" (pair_scores older than their qa_pairs) still has an answer for compacted documents.
_MANIFEST_SCHEMA = {"stem": pl.String(), "document": pl.String(), "segment": pl.String(), "written_ns": pl.Int64()}
# A segment replaced by a compaction stays on disk this long, for queries that listed it just before.
RETIRED_SEGMENT_GRACE_S = 3600.0
# Sorted by document in row groups this small, a segment serves one document's rows without reading the rest.
_ROW_GROUP_ROWS = 8192
# Segments smaller than this are merged again by the next compaction, so their number stays small.
SMALL_SEGMENT_BYTES = 64 << 20


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class Compaction:
    """What one compaction of a table did."""

    table: str
    documents: int  # per-document files and deletions folded into the new segment
    segments_merged: int
    seconds: float


class TableFiles:
    """Reads, writes and compacts the files of one table under `directory` (see the module docstring)."""

    def __init__(self, directory: Path, table: str):
        self.directory = directory
        self.table = table
        self.compacted_dir = directory / "compacted"
        self._manifest_cache: tuple[tuple[int, int], pl.DataFrame] | None = None

    # --- the per-document files -------------------------------------------------------------------

    def part_file(self, stem: str) -> Path:
        return self.directory / f"{stem}{_PART_SUFFIX}"

    def deleted_marker(self, stem: str) -> Path:
        return self.directory / f"{stem}{_DELETED_SUFFIX}"

    def part_files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(
            Path(entry.path)
            for entry in os.scandir(self.directory)
            if entry.name.endswith(_PART_SUFFIX) and not entry.name.startswith(".") and entry.is_file()
        )

    def _stems(self) -> tuple[set[str], set[str]]:
        """Stems of the per-document files and of the deletion markers."""
        parts, deleted = set(), set()
        if self.directory.is_dir():
            for entry in os.scandir(self.directory):
                if entry.name.startswith("."):
                    continue
                if entry.name.endswith(_PART_SUFFIX):
                    parts.add(entry.name[: -len(_PART_SUFFIX)])
                elif entry.name.endswith(_DELETED_SUFFIX):
                    deleted.add(entry.name[: -len(_DELETED_SUFFIX)])
        return parts, deleted

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held (shared) for the instant a writer renames a file into the table, so that a compaction
        never deletes a per-document file that was replaced after it read it."""
        with _locked(self.directory / ".lock", fcntl.LOCK_SH):
            yield

    # --- the compacted segments -------------------------------------------------------------------

    def manifest(self) -> pl.DataFrame:
        """stem, document, segment and written_ns of every compacted document that has rows."""
        path = self.compacted_dir / _MANIFEST
        try:
            info = path.stat()
        except FileNotFoundError:
            return pl.DataFrame(schema=_MANIFEST_SCHEMA)
        stamp = (info.st_ino, info.st_mtime_ns)
        if self._manifest_cache is None or self._manifest_cache[0] != stamp:
            manifest = pl.read_parquet(path)
            # A manifest from before written_ns: the times are unknown (null).
            manifest = manifest.with_columns(pl.lit(None, pl.Int64()).alias(name) for name in
                                             _MANIFEST_SCHEMA.keys() - set(manifest.columns))
            self._manifest_cache = (stamp, manifest.select(list(_MANIFEST_SCHEMA)))
        return self._manifest_cache[1]

    def compacted_rows(self, stem: str) -> pl.DataFrame | None:
        """A compacted document's rows (read from its segment alone), or None when it is not compacted."""
        entry = self.manifest().filter(pl.col("stem") == stem)
        if entry.height == 0:
            return None
        document, segment = entry["document"][0], entry["segment"][0]
        return pl.scan_parquet(self.compacted_dir / segment).filter(pl.col("document") == document).collect()

    def is_deleted(self, stem: str) -> bool:
        return self.deleted_marker(stem).exists()

    def written_times(self, stems: Iterable[str]) -> dict[str, int]:
        """stem → when the document's current rows were written (ns): its own file's modification time,
        else the time that file had when it was compacted (0 if compacted before that was recorded).
        Stems with neither, or deleted, are left out."""
        parts, deleted = self._stems()
        compacted = dict(self.manifest().select("stem", pl.col("written_ns").fill_null(0)).iter_rows())
        times = {}
        for stem in stems:
            stamp = _stamp(self.part_file(stem)) if stem in parts else None
            if stamp is not None:
                times[stem] = stamp[1]
            elif stem in compacted and stem not in deleted:
                times[stem] = compacted[stem]
        return times

    def view_sql(self) -> str | None:
        """The body of the table's view, or None when it has no file yet."""
        # Per-document files are listed before the manifest is read: a compaction writes its manifest
        # before deleting the files it folded in, so a document is always in one or the other.
        parts, deleted = self._stems()
        manifest = self.manifest()
        segments = manifest["segment"].unique().sort().to_list()
        selects = []
        if segments:
            files = ", ".join(sql_string(str(self.compacted_dir / name)) for name in segments)
            superseded = manifest.filter(pl.col("stem").is_in(list(parts | deleted)))["document"].to_list()
            where = ""
            if superseded:
                where = f" WHERE document NOT IN ({', '.join(sql_string(key) for key in superseded)})"
            selects.append(f"SELECT * FROM read_parquet([{files}], union_by_name = true){where}")
        if parts:
            pattern = sql_string(str(self.directory / f"*{_PART_SUFFIX}"))
            selects.append(f"SELECT * FROM read_parquet({pattern}, union_by_name = true)")
        return " UNION ALL BY NAME ".join(selects) or None

    def compact(self, min_documents: int = 1) -> Compaction | None:
        """Folds the per-document files and deletions into one new segment, with the segments that were
        small or held superseded documents; None when fewer than `min_documents` are waiting or another
        compaction of the table is running."""
        started = time.monotonic()
        self.compacted_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(_locked(self.compacted_dir / ".compacting", fcntl.LOCK_EX | fcntl.LOCK_NB))
            except BlockingIOError:
                return None
            parts, deleted = self._stems()
            if len(parts | deleted) < min_documents or not (parts | deleted):
                return None
            taken = {stem: _stamp(self.part_file(stem)) for stem in sorted(parts)}
            taken = {stem: stamp for stem, stamp in taken.items() if stamp is not None}
            manifest = self.manifest()
            superseded = set(taken) | deleted
            sizes = {name: _size(self.compacted_dir / name) for name in manifest["segment"].unique().to_list()}
            dirty = set(manifest.filter(pl.col("stem").is_in(list(superseded)))["segment"].to_list())
            merged = sorted(name for name, size in sizes.items() if name in dirty or size < SMALL_SEGMENT_BYTES)
            kept = manifest.filter(~pl.col("segment").is_in(merged))
            in_merged = manifest.filter(pl.col("segment").is_in(merged))
            carried = in_merged.filter(~pl.col("stem").is_in(list(superseded)))
            dropped = in_merged.filter(pl.col("stem").is_in(list(superseded)))["document"].to_list()
            name = f"{uuid.uuid4().hex}.parquet"
            part_documents = self._write_segment(name, [self.part_file(stem) for stem in taken], merged, dropped)
            new_rows = pl.DataFrame(
                {
                    "stem": [*carried["stem"].to_list(), *part_documents],
                    "document": [*carried["document"].to_list(), *part_documents.values()],
                    "segment": name,
                    "written_ns": [*carried["written_ns"].to_list(), *(taken[stem][1] for stem in part_documents)],
                },
                schema=_MANIFEST_SCHEMA,
            )
            with _locked(self.directory / ".lock", fcntl.LOCK_EX):
                from qa_pipeline.core.storage import write_parquet_atomic  # storage uses this module

                write_parquet_atomic(pl.concat([kept, new_rows]).sort("stem"), self.compacted_dir / _MANIFEST)
                for stem, stamp in taken.items():
                    if _stamp(self.part_file(stem)) == stamp:  # not replaced since it was read
                        self.part_file(stem).unlink()
                for stem in deleted:
                    self.deleted_marker(stem).unlink(missing_ok=True)
            for old in merged:
                os.utime(self.compacted_dir / old)  # retired now: see _drop_retired_segments
            self._drop_retired_segments({*kept["segment"].to_list(), name})
        return Compaction(self.table, len(taken) + len(deleted), len(merged), time.monotonic() - started)

    def _write_segment(self, name: str, parts: list[Path], merged: list[str], superseded: list[str]) -> dict[str, str]:
        """Writes the per-document files and the rest of the merged segments as one file sorted by document
        (a document's rows in their file's order); stem → document of the files that had rows. A file
        without rows needs no entry: its stem supersedes the document's earlier rows, which is all it says."""
        frames, documents = [], {}
        for path in parts:
            try:
                frame = pl.read_parquet(path)
            except FileNotFoundError:
                continue  # deleted meanwhile: its deletion marker keeps it out of the views
            if frame.height:
                documents[path.name[: -len(_PART_SUFFIX)]] = frame["document"][0]
                frames.append(frame)
        for segment in merged:
            frames.append(
                pl.scan_parquet(self.compacted_dir / segment).filter(~pl.col("document").is_in(superseded)).collect()
            )
        frames = [frame for frame in frames if frame.height]
        if frames:
            from qa_pipeline.core.storage import write_parquet_atomic  # storage uses this module

            rows = pl.concat(frames, how="diagonal_relaxed").sort("document", maintain_order=True)
            write_parquet_atomic(rows, self.compacted_dir / name, row_group_size=_ROW_GROUP_ROWS)
        return documents

    def _drop_retired_segments(self, live: set[str]) -> None:
        now = time.time()
        for entry in os.scandir(self.compacted_dir):
            if entry.name.endswith(".parquet") and entry.name != _MANIFEST and entry.name not in live:
                if now - entry.stat().st_mtime > RETIRED_SEGMENT_GRACE_S:
                    os.unlink(entry.path)


@contextlib.contextmanager
def _locked(path: Path, operation: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), operation)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
