"""Batch-file interop: the generation requests as an OpenAI/vLLM batch input file, and a batch output
file (from `vllm run-batch` or an OpenAI-compatible batch API) read back into `qa_pairs`."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from qa_pipeline.core.client import ChatOutcome, chat_request_body, outcome_from_payload
from qa_pipeline.core.generation import ChunkTask, GenerationSettings, request_hasher, result_from_outcome
from qa_pipeline.core.prompts import FailureReason
from qa_pipeline.core.storage import ChunkResult, Journal, Storage, write_text_atomic

BATCH_URL = "/v1/chat/completions"

CHUNKS_SQL = """
SELECT document, chunk_id, position, content, heading_path FROM chunks ORDER BY document, position
"""


def custom_id(chunk_id: str, key: str) -> str:
    """The chunk and the request hash (the response cache key): 49 characters, within OpenAI's 64."""
    return f"{chunk_id}-{key}"


def parse_custom_id(text: str) -> tuple[str, str]:
    chunk_id, _, key = text.partition("-")
    if not chunk_id or not key:
        raise ValueError(f"custom_id {text!r} was not written by qa-pipeline export-batch (expected CHUNK-HASH)")
    return chunk_id, key


@dataclass
class BatchExport:
    path: Path
    requests: int
    already_done: int


def export_batch_requests(
    storage: Storage,
    path: Path,
    model: str,
    settings: GenerationSettings | None = None,
    documents: Iterable[str] | None = None,
    include_done: bool = False,
) -> BatchExport:
    """One batch request per chunk (`custom_id`, `method`, `url`, `body`), skipping chunks whose request
    already has QA pairs in the journal unless include_done: exactly what `qa_pairs` would still send."""
    settings = settings or GenerationSettings()
    schema = settings.schema()
    key_of = request_hasher(model, settings, schema)
    wanted = set(documents) if documents is not None else None
    chunks = storage.query(CHUNKS_SQL)
    lines, done = [], 0
    finished: dict[str, dict[str, ChunkResult]] = {}
    for row in chunks.iter_rows(named=True):
        document = row["document"]
        if wanted is not None and document not in wanted:
            continue
        messages = settings.messages(row["content"], row["heading_path"])
        key = key_of(messages)
        if not include_done:
            if document not in finished:
                finished[document] = Journal(storage.layout.journal_file(document)).load()
            if key in finished[document] and finished[document][key].ok:
                done += 1
                continue
        line = {
            "custom_id": custom_id(row["chunk_id"], key),
            "method": "POST",
            "url": BATCH_URL,
            "body": chat_request_body(
                model,
                messages,
                response_format=schema,
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                seed=settings.seed,
            ),
        }
        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    write_text_atomic("".join(lines), path)
    return BatchExport(path=path, requests=len(lines), already_done=done)


@dataclass
class BatchImport:
    imported: int = 0
    failed: int = 0
    unknown_chunks: list[str] = field(default_factory=list)
    malformed_lines: list[int] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)


def outcome_from_batch_line(line: dict, endpoint: str) -> ChatOutcome:
    """A batch output line as the client's outcome of one request: the response body on success,
    else the status and error the batch runner recorded."""
    response = line.get("response") or {}
    status = response.get("status_code")
    body = response.get("body")
    if status == 200 and isinstance(body, dict) and not line.get("error"):
        outcome = outcome_from_payload(body, endpoint)
        outcome.attempts = 1
        return outcome
    error = line.get("error")
    if isinstance(error, dict):
        inner = error.get("error") if isinstance(error.get("error"), dict) else error
        message = inner.get("message") or json.dumps(error)
    else:
        message = str(error or body or "no response body")
    return ChatOutcome(
        ok=False,
        status=status,
        endpoint=endpoint,
        attempts=1,
        failure_reason=FailureReason.RATE_LIMITED if status == 429 else FailureReason.HTTP_ERROR,
        error=f"batch request failed (HTTP {status}): {message[:500]}",
    )


def import_batch_output(storage: Storage, path: Path, settings: GenerationSettings | None = None) -> BatchImport:
    """Reads a batch output file into the journal (validated like an online answer: pairs or a failure
    record), then rewrites `qa_pairs`, `failures` and `pair_scores` of every document it touches.

    Lines are joined to chunks on `custom_id`; the journal keys them by the request hash inside it,
    so a later `qa_pairs` run with the same model and settings reuses them instead of asking again.
    `settings` are those the requests were exported with: their question types are the slots each
    answer must fill, their prompt version is recorded (an output file does not hold its requests, so
    they cannot be read from it).
    """
    settings = settings or GenerationSettings()
    chunks = {row["chunk_id"]: row for row in storage.query(CHUNKS_SQL).iter_rows(named=True)}
    endpoint = f"batch:{path.name}"
    summary = BatchImport()
    results: dict[str, list[ChunkResult]] = defaultdict(list)
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
                chunk_id, key = parse_custom_id(line["custom_id"])
            except (ValueError, KeyError, TypeError):
                summary.malformed_lines.append(number)
                continue
            chunk = chunks.get(chunk_id)
            if chunk is None:
                summary.unknown_chunks.append(chunk_id)
                continue
            task = ChunkTask(chunk["document"], chunk_id, chunk["content"], tuple(chunk["heading_path"]))
            outcome = outcome_from_batch_line(line, endpoint)
            body = (line.get("response") or {}).get("body") or {}
            result = result_from_outcome(
                task, key, str(body.get("model") or ""), outcome, settings.max_tokens, settings, settings.temperature
            )
            results[task.document].append(result)
            if result.ok:
                summary.imported += 1
            else:
                summary.failed += 1
    for document, imported in sorted(results.items()):
        journal = Journal(storage.layout.journal_file(document))
        with journal:
            for result in imported:
                journal.append(result)
        # The same rules as a `qa_pairs` run: per current chunk its newest result with pairs, else its newest failure.
        storage.publish_document(document, journal.load().values())
        summary.documents.append(document)
    return summary
