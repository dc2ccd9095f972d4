"""Writes a document's `chunks`, `qa_pairs` and `failures` partitions as the pipeline does, for tests
of what reads them (scores, checks, report, export) without generating anything."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl

from qa_pipeline.core.chunking import CHUNK_SCHEMA, chunk_document, chunks_to_frame
from qa_pipeline.core.documents import discover_documents, read_document
from qa_pipeline.core.generation import ChunkTask
from qa_pipeline.core.prompts import QAPair
from qa_pipeline.core.storage import ChunkResult, Storage, results_to_frames
from qa_pipeline_tests.conftest import SAMPLE_SOURCES


def write_document(
    storage: Storage,
    document: str,
    chunks: dict[str, str],
    pairs: dict[str, list[tuple[str, str, str]]],
    failures: dict[str, str] | None = None,
) -> None:
    """chunks: chunk_id → content; pairs: chunk_id → [(question, answer, type)]; failures: chunk_id → reason."""
    chunk_rows = [
        {
            "document": document,
            "chunk_id": chunk_id,
            "position": position,
            "heading_path": [],
            "content": content,
            "n_tokens": len(content.split()),
            "content_hash": chunk_id,
            "service": None,
            "doc_type": None,
            "source_chunk_id": None,
            "metadata_json": "{}",
        }
        for position, (chunk_id, content) in enumerate(chunks.items())
    ]
    results = [
        ChunkResult(
            document=document,
            chunk_id=chunk_id,
            request_hash=f"hash-{chunk_id}",
            ok=True,
            pairs=[QAPair(question=q, answer=a, type=t) for q, a, t in chunk_pairs],
            model="test-model",
            finished_at=datetime.now(UTC),
        )
        for chunk_id, chunk_pairs in pairs.items()
    ]
    results += [
        ChunkResult(
            document=document,
            chunk_id=chunk_id,
            request_hash=f"hash-{chunk_id}",
            ok=False,
            reason=reason,
            detail="written by a test",
            finished_at=datetime.now(UTC),
        )
        for chunk_id, reason in (failures or {}).items()
    ]
    pair_frame, failure_frame = results_to_frames(results)
    storage.write_partition("chunks", document, pl.DataFrame(chunk_rows, schema=CHUNK_SCHEMA))
    storage.write_partition("qa_pairs", document, pair_frame)
    storage.write_partition("failures", document, failure_frame)


def write_sample_chunks(storage: Storage, name: str) -> list[ChunkTask]:
    """The real chunks of a sample document, written as the `chunks` asset writes them."""
    source = next(s for s in discover_documents(SAMPLE_SOURCES) if s.key == name)
    frame = chunks_to_frame(chunk_document(read_document(source)))
    storage.write_partition("chunks", name, frame)
    return [ChunkTask(name, r["chunk_id"], r["content"], tuple(r["heading_path"])) for r in frame.iter_rows(named=True)]
