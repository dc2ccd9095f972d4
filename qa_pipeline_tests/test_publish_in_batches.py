"""A large document is published a batch of chunks at a time (so memory does not grow with it), and its
tables are the same as if it were published in one piece: rows in chunk order, one result per chunk,
duplicate questions found across batches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from qa_pipeline.core.chunking import CHUNK_SCHEMA
from qa_pipeline.core.layout import DataLayout, Table
from qa_pipeline.core.prompts import QAPair
from qa_pipeline.core.storage import ChunkResult, Storage

DOCUMENT = "manual.md"
CHUNKS = 23
START = datetime(2026, 1, 1, tzinfo=UTC)


def chunk_frame() -> pl.DataFrame:
    rows = [
        {
            "document": DOCUMENT, "chunk_id": f"c{i:02d}", "position": i, "heading_path": ["Manual", f"Part {i}"],
            "content": f"Part {i}: the worker {i} restarts after {i * 3} seconds and logs to /var/log/w{i}.log.",
            "n_tokens": 20, "content_hash": f"h{i}", "service": None, "doc_type": None, "source_chunk_id": None,
            "metadata_json": "{}",
        }
        for i in range(CHUNKS)
    ]
    return pl.DataFrame(rows, schema=CHUNK_SCHEMA)


def results() -> list[ChunkResult]:
    """One answer per chunk (chunk 7 failed first, then answered; chunk 11 only failed), plus an answer for
    a chunk no longer in the document; chunk 21 asks chunk 1's question again, many batches later."""
    made = []
    for i in range(CHUNKS):
        if i == 11:
            continue
        question = "How long does worker 1 wait before it restarts?" if i == 21 else f"How long does worker {i} wait?"
        pairs = [
            QAPair(question=question, answer=f"It restarts after {i * 3} seconds.", type="factual"),
            QAPair(question=f"Where does worker {i} log?", answer=f"To /var/log/w{i}.log.", type="conceptual"),
        ]
        made.append(
            ChunkResult(document=DOCUMENT, chunk_id=f"c{i:02d}", request_hash=f"k{i}", ok=True, pairs=pairs,
                        model="m", finished_at=START + timedelta(seconds=i))
        )
    made[1] = made[1].model_copy(update={"pairs": [QAPair(question="How long does worker 1 wait before it restarts?",
                                                          answer="It restarts after 3 seconds.", type="factual")]})
    failed = dict(document=DOCUMENT, ok=False, reason="invalid_json", detail="cut", model="m")
    made.append(ChunkResult(chunk_id="c07", request_hash="k7-old", finished_at=START, **failed))
    made.append(ChunkResult(chunk_id="c11", request_hash="k11", finished_at=START, **failed))
    made.append(ChunkResult(chunk_id="gone", request_hash="kx", finished_at=START, **failed))
    return made


def publish(root: Path, batch_chunks: int):
    storage = Storage(DataLayout(root), batch_chunks=batch_chunks)
    storage.write_partition(Table.CHUNKS, DOCUMENT, chunk_frame())
    published = storage.publish_document(DOCUMENT, results())
    tables = {t: storage.read_partition(t, DOCUMENT) for t in (Table.QA_PAIRS, Table.FAILURES, Table.PAIR_SCORES)}
    return published, tables, storage


def test_a_document_published_in_batches_has_the_same_tables_as_one_published_whole(tmp_path):
    whole, whole_tables, _ = publish(tmp_path / "whole", batch_chunks=1000)
    batched, batched_tables, _ = publish(tmp_path / "batched", batch_chunks=4)

    for table, frame in whole_tables.items():
        assert batched_tables[table].equals(frame), f"{table} differs when published 4 chunks at a time"
    pairs = batched_tables[Table.QA_PAIRS]
    assert pairs["chunk_id"].unique(maintain_order=True).to_list() == [f"c{i:02d}" for i in range(CHUNKS) if i != 11]
    assert batched_tables[Table.FAILURES]["chunk_id"].to_list() == ["c11"], "c07's later answer wins over its failure"
    scores = batched_tables[Table.PAIR_SCORES]
    repeated = scores.filter((pl.col("chunk_id") == "c21") & (pl.col("pair_index") == 0))
    assert repeated["duplicate_scope"].to_list() == ["document"]
    assert repeated["duplicate_of_chunk_id"].to_list() == ["c01"], "found across five batches"
    assert (batched.answered, batched.failure_rate) == (whole.answered, whole.failure_rate) == (CHUNKS, 1 / CHUNKS)
    assert batched.pairs.height == whole.pairs.height == pairs.height


def test_publishing_unchanged_results_again_keeps_the_files(tmp_path):
    _, _, storage = publish(tmp_path, batch_chunks=4)
    files = [storage.layout.partition_file(t, DOCUMENT) for t in (Table.QA_PAIRS, Table.FAILURES, Table.PAIR_SCORES)]
    before = [(path.stat().st_ino, path.stat().st_mtime_ns) for path in files]

    again = storage.publish_document(DOCUMENT, results())

    assert [(path.stat().st_ino, path.stat().st_mtime_ns) for path in files] == before
    assert again.scores.height == again.pairs.height == storage.read_partition(Table.QA_PAIRS, DOCUMENT).height
    assert not list(storage.layout.table_dir(Table.QA_PAIRS).glob(".*.tmp")), "no temporary file is left behind"
