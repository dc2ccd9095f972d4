"""Pair scores are brought up to date (report, export) whether a document's files are its own or
compacted into segments."""

from __future__ import annotations

import time

import polars as pl

from qa_pipeline.core.layout import DataLayout, Table
from qa_pipeline.core.quality import SCORER_VERSION, refresh_pair_scores
from qa_pipeline.core.storage import Storage
from qa_pipeline_tests.written_outputs import write_document


def _write(storage: Storage, document: str, question: str) -> None:
    write_document(
        storage,
        document,
        {f"{document}#0": "The scheduler assigns every chunk to a worker as soon as one is free."},
        {f"{document}#0": [(question, "The scheduler assigns it to a free worker.", "factual")]},
    )


def _scored(storage: Storage) -> dict[str, tuple[str, str]]:
    """document → (its question as scored, scorer version), through the views."""
    rows = storage.query(
        "SELECT document, question_normalized, scorer_version FROM pair_scores ORDER BY document"
    ).rows()
    return {document: (question, version) for document, question, version in rows}


def test_outputs_without_scores_in_a_compacted_layout_get_scored(tmp_path):
    storage = Storage(DataLayout(root=tmp_path / "data"))
    for n in range(3):
        _write(storage, f"guide/page-{n}.md", f"Which worker gets chunk {n}?")
    assert storage.compact()  # answers without scores, all in segments now
    assert not list(storage.layout.table_dir(Table.QA_PAIRS).glob("*.parquet"))

    assert refresh_pair_scores(Storage(storage.layout)) == ["guide/page-0.md", "guide/page-1.md", "guide/page-2.md"]

    assert _scored(Storage(storage.layout)) == {
        f"guide/page-{n}.md": (f"which worker gets chunk {n}", SCORER_VERSION) for n in range(3)
    }
    assert refresh_pair_scores(Storage(storage.layout)) == []  # up to date now
    storage.compact()  # the scores in segments too: still up to date
    assert refresh_pair_scores(Storage(storage.layout)) == []


def test_compacted_scores_older_than_their_answers_or_by_an_earlier_scorer_are_scored_again(tmp_path):
    storage = Storage(DataLayout(root=tmp_path / "data"))
    for name in ("current.md", "rewritten.md", "earlier-scorer.md", "rewritten-after-compaction.md"):
        _write(storage, name, "Which worker gets the chunk?")
    assert refresh_pair_scores(storage) == sorted(
        ["current.md", "rewritten.md", "earlier-scorer.md", "rewritten-after-compaction.md"]
    )
    old_scores = storage.read_partition(Table.PAIR_SCORES, "earlier-scorer.md")
    storage.write_partition(
        Table.PAIR_SCORES, "earlier-scorer.md", old_scores.with_columns(scorer_version=pl.lit("scores-v1"))
    )
    time.sleep(0.05)  # the answers below are written strictly after the scores, whatever the clock's grain
    _write(storage, "rewritten.md", "Which worker receives the next chunk?")
    storage.compact()  # answers and scores of every document in segments
    _write(storage, "rewritten-after-compaction.md", "Who receives the next chunk?")  # its own file again

    assert refresh_pair_scores(Storage(storage.layout)) == [
        "earlier-scorer.md", "rewritten-after-compaction.md", "rewritten.md"
    ]

    scored = _scored(Storage(storage.layout))
    assert scored["rewritten.md"] == ("which worker receives the next chunk", SCORER_VERSION)
    assert scored["rewritten-after-compaction.md"] == ("who receives the next chunk", SCORER_VERSION)
    assert scored["earlier-scorer.md"] == ("which worker gets the chunk", SCORER_VERSION)
    assert refresh_pair_scores(Storage(storage.layout)) == []
