"""Compacted document tables: the views, a document's rows, replacement, deletion and restore behave as
with one file per document, while the table is a few large files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl

from qa_pipeline.core.layout import PARTITIONED_TABLES, DataLayout, Table
from qa_pipeline.core.storage import Storage
from qa_pipeline_tests.written_outputs import write_document

REPO = Path(__file__).resolve().parents[1]


def _dataset(tmp_path, documents: int = 30) -> Storage:
    storage = Storage(DataLayout(root=tmp_path / "data"))
    for n in range(documents):
        write_document(
            storage,
            f"guide/page-{n:03d}.md",
            {f"c{n}a": f"Page {n} explains the backup.", f"c{n}b": f"Page {n} lists the options."},
            {f"c{n}a": [(f"What does page {n} explain?", "The backup.", "factual")]},
            failures={f"c{n}b": "truncated"} if n % 3 == 0 else None,
        )
    return storage


def _snapshot(storage: Storage) -> dict[str, list[tuple]]:
    sql = "SELECT * FROM {} ORDER BY ALL"
    return {table: storage.query(sql.format(table)).rows() for table in (Table.CHUNKS, Table.QA_PAIRS, Table.FAILURES)}


def _files(storage: Storage, table: str) -> list[str]:
    return sorted(p.name for p in storage.layout.table_dir(table).rglob("*.parquet"))


def test_compacting_keeps_every_row_and_each_documents_rows_in_a_few_files(tmp_path):
    storage = _dataset(tmp_path)
    before = _snapshot(storage)
    one = {table: storage.read_partition(table, "guide/page-003.md") for table in PARTITIONED_TABLES}

    compactions = Storage(storage.layout).compact()

    assert {c.table for c in compactions} == {Table.CHUNKS, Table.QA_PAIRS, Table.FAILURES}
    assert _snapshot(Storage(storage.layout)) == before
    for table in (Table.CHUNKS, Table.QA_PAIRS):
        assert len(_files(storage, table)) == 2  # one segment and the manifest
        assert Storage(storage.layout).read_partition(table, "guide/page-003.md").equals(one[table])
    assert Storage(storage.layout).read_partition(Table.FAILURES, "guide/page-001.md") is None  # had no rows
    assert Storage(storage.layout).compact() == []  # nothing written since


def test_a_compacted_document_written_again_shows_only_its_new_rows_before_and_after_the_next_compaction(tmp_path):
    storage = _dataset(tmp_path)
    storage.compact()
    write_document(storage, "guide/page-004.md", {"new": "A new text."}, {"new": [("New?", "Yes.", "factual")]})
    expected = storage.query("SELECT question FROM qa_pairs WHERE document = 'guide/page-004.md'")

    assert expected["question"].to_list() == ["New?"]
    assert storage.query("SELECT count(*) AS n FROM qa_pairs")["n"][0] == 30
    storage.compact()
    again = Storage(storage.layout)
    assert again.query("SELECT question FROM qa_pairs WHERE document = 'guide/page-004.md'").equals(expected)
    assert again.read_partition(Table.CHUNKS, "guide/page-004.md")["chunk_id"].to_list() == ["new"]
    assert again.query("SELECT count(*) AS n FROM chunks")["n"][0] == 59


def test_a_deleted_compacted_document_leaves_the_views_and_moving_its_trash_back_restores_it(tmp_path):
    storage = _dataset(tmp_path)
    storage.compact()
    before = _snapshot(storage)

    trash = storage.delete_partition("guide/page-006.md")

    assert trash is not None
    assert storage.query("SELECT count(*) AS n FROM chunks WHERE document = 'guide/page-006.md'")["n"][0] == 0
    assert storage.read_partition(Table.QA_PAIRS, "guide/page-006.md") is None
    storage.compact()  # the deletion survives a compaction
    assert Storage(storage.layout).query("SELECT count(*) AS n FROM qa_pairs")["n"][0] == 29

    shutil.copytree(trash, storage.layout.root, dirs_exist_ok=True)
    assert _snapshot(Storage(storage.layout)) == before
    storage.compact()
    assert _snapshot(Storage(storage.layout)) == before


def test_a_table_never_compacted_keeps_one_plain_file_per_document(tmp_path):
    storage = _dataset(tmp_path, documents=3)
    storage.delete_partition("guide/page-001.md")

    assert _files(storage, Table.CHUNKS) == sorted(
        storage.layout.partition_file(Table.CHUNKS, f"guide/page-{n:03d}.md").name for n in (0, 2)
    )
    assert not list(storage.layout.table_dir(Table.CHUNKS).glob("*.deleted"))
    assert pl.Series(storage.query("SELECT DISTINCT document FROM chunks ORDER BY 1")["document"]).to_list() == [
        "guide/page-000.md", "guide/page-002.md"
    ]


def test_qa_pipeline_compact_folds_the_files_and_sql_answers_the_same(tmp_path):
    storage = _dataset(tmp_path, documents=5)
    query = "SELECT document, count(*) AS pairs FROM qa_pairs GROUP BY document ORDER BY document"

    def cli(*args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QA_PIPELINE_")}
        done = subprocess.run(
            [sys.executable, "-m", "qa_pipeline.cli", *args, "--data-dir", str(storage.layout.root)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    before = cli("sql", query, "--format", "csv")
    printed = cli("compact")

    assert "qa_pairs: 5 documents folded into a segment" in printed
    assert cli("sql", query, "--format", "csv") == before
    assert "nothing written or deleted" in cli("compact")
