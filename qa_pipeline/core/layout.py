"""The one place that knows where qa_pipeline keeps its files under the data directory."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from qa_pipeline.core.documents import FileStamp, SourceFile, discover_documents, find_document
from qa_pipeline.core.settings import StorageSettings


class Table(StrEnum):
    """The tables of a data directory, each a DuckDB view of the same name (schemas: core/storage.py)."""

    CHUNKS = "chunks"
    QA_PAIRS = "qa_pairs"
    FAILURES = "failures"
    PAIR_SCORES = "pair_scores"
    BENCHMARK_RUNS = "benchmark_runs"  # one partition per benchmark run
    QUESTION_DUPLICATES = "question_duplicates"  # one partition, written by the report
    JUDGEMENTS = "judgements"  # one partition per judged_sample run
    MODEL_COMPARISON = "model_comparison"  # one partition, written by `qa-pipeline compare`
    MULTIHOP_PAIRS = "multihop_pairs"  # optional: questions that need two or three chunks (core/multihop.py)
    MULTIHOP_FAILURES = "multihop_failures"  # the groups of chunks that got no multi-hop pair, and why


# The tables of each document, one partition per document (partition key = the `document` column).
PARTITIONED_TABLES = (
    Table.CHUNKS, Table.QA_PAIRS, Table.FAILURES, Table.PAIR_SCORES, Table.MULTIHOP_PAIRS, Table.MULTIHOP_FAILURES,
)
# Tables kept apart per named model (see `DataLayout.for_model`); chunks and the test sample are shared.
MODEL_TABLES = (Table.QA_PAIRS, Table.FAILURES, Table.PAIR_SCORES, Table.BENCHMARK_RUNS)


def safe_file_stem(key: str) -> str:
    """A file name for a partition key: readable, filesystem-safe and unique per key."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "document"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]
    return f"{readable}-{digest}"


@dataclass(frozen=True)
class DataLayout:
    """Paths under one data root; every reader and writer goes through this."""

    root: Path
    sources_override: Path | None = None
    # Read files that links in the sources folder lead to outside it (QA_PIPELINE_FOLLOW_EXTERNAL_SYMLINKS).
    follow_external_symlinks: bool = False
    # A named model (QA_PIPELINE_MODELS_FILE): its MODEL_TABLES and journals live in folders of their own,
    # so its outputs and cached answers never replace another model's. None: the configured generator.
    model: str | None = None

    def for_model(self, model: str | None) -> DataLayout:
        """The same data root, seen from one named model (None: the default generator's files)."""
        return dataclasses.replace(self, model=model)

    def named_models(self) -> list[str]:
        """The named models that have outputs under this data root."""
        folder = self.outputs_dir / "models"
        return sorted(path.name for path in folder.iterdir() if path.is_dir()) if folder.exists() else []

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None, sources_dir: str | Path | None = None) -> DataLayout:
        """Explicit arguments win over QA_PIPELINE_DATA_DIR / QA_PIPELINE_SOURCES_DIR, then ./data."""
        settings = StorageSettings.load(data_dir=data_dir or None, sources_dir=sources_dir or None)
        return cls.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> DataLayout:
        root = settings.data_dir.expanduser().absolute()
        sources = settings.sources_dir.expanduser().absolute() if settings.sources_dir else None
        return cls(root=root, sources_override=sources, follow_external_symlinks=settings.follow_external_symlinks)

    @property
    def sources_dir(self) -> Path:
        return self.sources_override or self.root / "sources"

    def discover_sources(self) -> list[SourceFile]:
        """The documents under the sources folder (links leading outside it only if the setting allows).

        Files whose size, times and inode are those recorded when they were last hashed are not read
        again (see `source_stamps_file`): a folder of unchanged documents costs a `stat` per file.
        """
        from qa_pipeline.core.storage import read_source_stamps, write_source_stamps  # storage imports layout

        known = read_source_stamps(self.source_stamps_file)
        before = dict(known)
        found = discover_documents(self.sources_dir, follow_external_symlinks=self.follow_external_symlinks, known=known)
        if known != before and self.root.is_dir():
            write_source_stamps(known, self.source_stamps_file)
        return found

    def source_file(self, key: str) -> SourceFile | None:
        """The file of one document (partition key), read on its own, or None when it is not in the folder."""
        return find_document(self.sources_dir, key, follow_external_symlinks=self.follow_external_symlinks)

    @property
    def source_stamps_file(self) -> Path:
        """The content hash of each source file with the stamp (size, times, inode) it was computed at."""
        return self.root / "source-stamps.parquet"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    def table_dir(self, table: str) -> Path:
        if self.model is not None and table in MODEL_TABLES:
            return self.outputs_dir / "models" / self.model / table
        return self.outputs_dir / table

    def partition_file(self, table: str, document: str) -> Path:
        return self.table_dir(table) / f"{safe_file_stem(document)}.parquet"

    def journal_file(self, document: str, table: str = Table.QA_PAIRS) -> Path:
        """The journal (response cache) of one document's requests for `table`: `qa_pairs`, or
        `multihop_pairs` in a folder of its own."""
        folder = self.root / "journal" if self.model is None else self.root / "journal" / "models" / self.model
        if table != Table.QA_PAIRS:
            folder = folder / str(table)
        return folder / f"{safe_file_stem(document)}.jsonl"

    @property
    def sources_registry_file(self) -> Path:
        """Which sources folder the dataset's documents were registered from (see core/registry.py)."""
        return self.root / "sources-registry.json"

    @property
    def trash_dir(self) -> Path:
        """Outputs and journals of deleted documents, one folder per deletion, restorable by moving back."""
        return self.root / "trash"

    @property
    def test_sample_file(self) -> Path:
        return self.outputs_dir / "test_sample.parquet"

    @property
    def benchmark_dir(self) -> Path:
        return self.table_dir(Table.BENCHMARK_RUNS)

    @property
    def report_dir(self) -> Path:
        return self.root / "reports"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"
