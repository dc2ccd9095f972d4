"""Writes a document's `chunks`, `qa_pairs` and `failures` partitions as the pipeline does, for tests
of what reads them (scores, checks, report, export) without generating anything."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl

from qa_pipeline.core.chunking import CHUNK_SCHEMA
from qa_pipeline.core.prompts import QAPair
from qa_pipeline.core.storage import ChunkResult, Storage, results_to_frames


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
