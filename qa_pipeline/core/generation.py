"""QA generation over many chunks: one dispatch loop of requests, journaled as each chunk finishes."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import signal
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import ClassVar

from pydantic import BaseModel, field_validator

from qa_pipeline.core.client import ChatOutcome, LLMClient, ServerUnavailableError
from qa_pipeline.core.concurrency import ConcurrencyGate, ConcurrencyLimit
from qa_pipeline.core.dispatch import Dispatcher
from qa_pipeline.core.dispatch import StalledError as StalledError  # raised by Generator.run
from qa_pipeline.core.layout import DataLayout, Table
from qa_pipeline.core.progress import Progress
from qa_pipeline.core.prompts import (
    DEFAULT_QUESTION_TYPES,
    PROMPT_VERSION,
    PROMPT_VERSIONS,
    FailureReason,
    ParseError,
    QAPair,
    build_messages,
    check_prompt_version,
    parse_pairs,
    question_types_described,
    response_format,
)
from qa_pipeline.core.settings import DEFAULT_MAX_TOKENS, DEFAULT_STALL_TIMEOUT_S
from qa_pipeline.core.storage import (
    ChunkResult,
    Journal,
    PUBLISH_BATCH_CHUNKS,
    JournalEntry,
    ResultsInChunkOrder,
    Storage,
    StorageFullError,
    format_bytes,
    journal_space_needed,
)


@functools.lru_cache(maxsize=64)
def _described(question_types: tuple[str, ...], descriptions: tuple[tuple[str, str], ...]) -> Mapping[str, str]:
    """`question_types_described`, worked out once per run's settings rather than once per prompt."""
    return MappingProxyType(question_types_described(question_types, dict(descriptions)))


class GenerationSettings(BaseModel):
    """Everything that shapes a request; all of it goes into the cache key.

    A kind of request other than one chunk's QA pairs (core/multihop.py) subclasses this and overrides
    `table`, `prompt_versions`, `prompt_version` and the `*_for(task)` methods; the Generator asks through them.
    """

    table: ClassVar[Table] = Table.QA_PAIRS  # the table (and journal) the answers go to
    prompt_versions: ClassVar[tuple[str, ...]] = PROMPT_VERSIONS  # the wordings this kind of request has

    question_types: tuple[str, ...] = DEFAULT_QUESTION_TYPES
    # One line per type telling the model what it is; types not named here keep their default line.
    question_type_descriptions: dict[str, str] = {}
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    seed: int | None = 0
    # How the request is worded (one of `prompt_versions`); a named model may choose its own.
    prompt_version: str = PROMPT_VERSION

    @field_validator("prompt_version")
    @classmethod
    def _known_version(cls, value: str) -> str:
        return check_prompt_version(value, cls.prompt_versions)

    def described_types(self) -> Mapping[str, str]:
        """type → description, in the order the pairs come (one schema slot each)."""
        return _described(tuple(self.question_types), tuple(self.question_type_descriptions.items()))

    def schema(self) -> dict:
        """The `response_format` of every request: one slot per question type."""
        return response_format(question_types=self.described_types())

    def messages(self, content: str, heading_path: Sequence[str] = ()) -> list[dict[str, str]]:
        return build_messages(content, list(heading_path), self.described_types(), self.prompt_version)

    def messages_for(self, task: ChunkTask) -> list[dict[str, str]]:
        return self.messages(task.content, task.heading_path)

    def schema_for(self, task: ChunkTask) -> dict | None:
        """The `response_format` of this task's request when it is not the run's (`schema()`), else None."""
        return None

    def parse(self, task: ChunkTask, content: str | None, finish_reason: str | None) -> list[QAPair]:
        """The validated pairs of an answer to this task's request, or a ParseError."""
        return parse_pairs(content, finish_reason, self.question_types)


@dataclass(frozen=True)
class ChunkTask:
    """One chunk to ask about."""

    document: str
    chunk_id: str
    content: str
    heading_path: tuple[str, ...] = ()


class ChunkTasks:
    """The chunks of some documents, read from their chunks tables a batch at a time on each pass: the
    generator goes over them twice without holding them (see `Generator.run`)."""

    def __init__(self, storage: Storage, documents: Sequence[str], batch_rows: int = PUBLISH_BATCH_CHUNKS):
        self.storage, self.batch_rows = storage, batch_rows
        counts = {d: storage.read_partition(Table.CHUNKS, d, columns=["chunk_id"]) for d in documents}
        self.documents = [document for document, ids in counts.items() if ids is not None]
        self.missing = [document for document, ids in counts.items() if ids is None]  # not chunked yet
        self._count = sum(ids.height for ids in counts.values() if ids is not None)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[ChunkTask]:
        for document in self.documents:
            for batch in self.storage.partition_batches(Table.CHUNKS, document, self.batch_rows):
                for chunk_id, content, heading_path in batch.select("chunk_id", "content", "heading_path").iter_rows():
                    yield ChunkTask(document, chunk_id, content, tuple(heading_path or ()))


class GenerationInterrupted(RuntimeError):
    """A stop was requested; finished chunks are in the journal and the next run resumes."""


# A 200 answer that cannot be turned into QA pairs is asked again (see Generator._ask): the
# server's next draw is often fine, while HTTP-level trouble was already retried by the client.
REASKED_REASONS = frozenset(
    {
        FailureReason.INVALID_JSON,
        FailureReason.MISSING_FIELD,
        FailureReason.INVALID_VALUE,
        FailureReason.TRUNCATED,
        FailureReason.EMPTY_RESPONSE,
    }
)
# Greedy decoding (temperature 0) would repeat the same answer, so a re-ask samples instead.
REASK_TEMPERATURE = 0.7
# A re-ask of an answer cut by max_tokens doubles the budget, up to this many times the configured one.
MAX_BUDGET_GROWTH = 4
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """A stop asked for by a thread that handles the signals (the command line's main thread) while the
    work runs in another: the generator there stops as it would on the signal itself."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.abandon = threading.Event()

    def request(self) -> bool:
        """Asks for a stop, then (asked again) to abandon requests in flight; True when this is the first."""
        if not self.stop.is_set():
            self.stop.set()
            return True
        self.abandon.set()
        return False


STOP_REQUESTS = StopRequests()


async def _relay_stop_requests(stop: asyncio.Event, abandon: asyncio.Event) -> None:
    while not abandon.is_set():
        if STOP_REQUESTS.stop.is_set():
            stop.set()
        if STOP_REQUESTS.abandon.is_set():
            abandon.set()
        await asyncio.sleep(0.1)


@contextmanager
def stop_on_signals(stop: asyncio.Event, abandon: asyncio.Event, log: Callable[[str], None]) -> Iterator[None]:
    """While chunks are generated, SIGINT/SIGTERM stop the run gracefully instead of raising anywhere.

    The first signal sets `stop` (no new chunk starts, requests in flight finish and are journaled);
    a second one sets `abandon`. On the way out the previous handlers come back and the signal is
    delivered to them again, so Dagster's run termination and Ctrl-C at the command line end the run
    as usual, only later: once the journal holds every finished chunk. Only the main thread can
    handle signals; elsewhere (the command line runs its work in a thread) the stop comes through
    `STOP_REQUESTS`, set by the thread that handles them.
    """
    loop = asyncio.get_running_loop()
    if threading.current_thread() is not threading.main_thread():
        relay = loop.create_task(_relay_stop_requests(stop, abandon))
        try:
            yield
        finally:
            relay.cancel()
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if not stop.is_set():
            stop.set()
            log(
                f"{signal.Signals(signum).name} received: stopping. No new chunk starts; requests in flight "
                "finish and are saved. Send the signal again to abandon them."
            )
        else:
            abandon.set()
            log(f"{signal.Signals(signum).name} received again: abandoning requests in flight")

    installed = []
    try:
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
    except (RuntimeError, ValueError, NotImplementedError):
        pass  # a loop that cannot handle signals: the previous handlers stay in charge
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
            signal.signal(signum, previous[signum])
        if received:
            signal.raise_signal(received[0])


@dataclass
class TelemetrySample:
    elapsed_s: float
    done: int
    in_flight: int
    limit: int
    output_tokens: int
    server_running: float | None
    server_waiting: float | None
    kv_cache_usage: float | None


@dataclass
class GenerationReport:
    """What a generation run did, per chunk and overall."""

    results: dict[str, Sequence[ChunkResult]]  # per document, in chunk order (read from the journal when asked for)
    sent: int = 0
    cached: int = 0
    duration_s: float = 0.0
    output_tokens: int = 0
    telemetry: list[TelemetrySample] = field(default_factory=list)

    def failure_rate(self, document: str) -> float:
        results = self.results.get(document, [])
        return sum(not r.ok for r in results) / len(results) if results else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0


# What `DocumentChunks.flags` say of a chunk.
_RENAMED = 1  # its result was journaled under another chunk id (moved, or repeating another chunk's text)
_SEND = 2  # this run sends its request
KEY_BYTES = 16  # a request hash: the first 16 bytes of a SHA-256, written as 32 hex digits


class DocumentChunks:
    """One document's chunks in a run, by position in chunk order: id, request hash, and where its result is
    in the journal, in flat arrays (about 100 bytes a chunk, its id included) instead of a dict of objects."""

    def __init__(self, document: str):
        self.document = document
        self.chunk_ids: list[str] = []
        self.keys = bytearray()  # KEY_BYTES per chunk
        self.offsets = array("q")  # byte offset of its result's line in the journal; -1 while it has none
        self.flags = bytearray()  # _RENAMED | _SEND
        self.repeats: dict[int, list[int]] = {}  # position sent → later positions asking the same request
        self.distinct = True  # no two chunks ask the same request

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def add(self, chunk_id: str, key: bytes) -> None:
        self.chunk_ids.append(chunk_id)
        self.keys += key
        self.offsets.append(-1)
        self.flags.append(0)

    def key(self, position: int) -> str:
        """The request hash of the chunk at `position`, as the journal writes it."""
        return self.keys[position * KEY_BYTES : (position + 1) * KEY_BYTES].hex()

    def plan(self, journal: Journal, force: bool = False) -> tuple[int, int]:
        """Marks the chunks to send: those without a successful result in `journal` (every chunk when
        forced), a request repeated within the document once; (chunks to send, repeats). The journal's
        index is only read here: where the results are is kept in `offsets`."""
        # Indexed even when forced: the journal then knows its line count, which compaction relies on.
        index = journal.index()
        if force:
            index.clear()
        first: dict[bytes, int] = {}
        sending = repeats = 0
        for position in range(len(self)):
            raw = bytes(self.keys[position * KEY_BYTES : (position + 1) * KEY_BYTES])
            earlier = first.setdefault(raw, position)
            if earlier != position:
                self.distinct = False
            entry = index.get(raw.hex()) if index else None
            if entry is not None and entry.ok:
                self._place(position, entry.offset, entry.chunk_id)
            elif earlier != position:
                repeats += 1  # the same text twice in a document: one request answers both chunks
                self.repeats.setdefault(earlier, []).append(position)
            else:
                self.flags[position] |= _SEND
                sending += 1
        return sending, repeats

    def settle(self, position: int, offset: int, chunk_id: str) -> None:
        """The result of the request sent for `position` (journaled as `chunk_id`'s) is on the line at `offset`."""
        self._place(position, offset, chunk_id)
        for repeat in self.repeats.get(position, ()):
            self._place(repeat, offset, chunk_id)

    def reindex(self, index: dict[str, JournalEntry]) -> None:
        """Finds every chunk's result again in a journal that was rewritten since (see `DocumentResults`)."""
        for position in range(len(self)):
            entry = index.get(self.key(position))
            if entry is not None:
                self._place(position, entry.offset, entry.chunk_id)

    def _place(self, position: int, offset: int, chunk_id: str) -> None:
        self.offsets[position] = offset
        renamed = _RENAMED if chunk_id != self.chunk_ids[position] else 0
        self.flags[position] = (self.flags[position] & _SEND) | renamed


class DocumentResults(ResultsInChunkOrder):
    """One document's results in chunk order, read from its journal line by line as they are asked for:
    a document of any size is published without its results all in memory."""

    def __init__(self, journal: Journal, chunks: DocumentChunks):
        self.journal = journal
        self.chunks = chunks  # ids, request hashes and journal offsets of the current chunks, in order
        self.chunk_ids = chunks.chunk_ids

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        chunks = self.chunks
        position = range(len(chunks))[index]
        key = chunks.key(position)
        result = self._read(position)
        if result is None or result.request_hash != key:
            # The journal was compacted by a later run since these offsets were taken: find them again.
            chunks.reindex(self.journal.index())
            result = self._read(position)
        chunk_id = chunks.chunk_ids[position]
        if result.chunk_id != chunk_id:  # moved, or the same text as another chunk
            result = result.model_copy(update={"chunk_id": chunk_id})
        return result

    def _read(self, position: int) -> ChunkResult | None:
        offset = self.chunks.offsets[position]
        return self.journal.read_at(offset) if offset >= 0 else None

    def renamed(self) -> bool:
        """Whether any result was journaled under another chunk id (moved, or repeating another chunk's text)."""
        return any(flag & _RENAMED for flag in self.chunks.flags)

    def are_the_whole_journal(self) -> bool:
        """Whether the journal is these results and nothing else, one line each: compaction has nothing to do."""
        return self.journal.lines == len(self) and self.chunks.distinct

    def rewrite(self) -> None:
        """Compacts the journal to these results and notes where each one now is."""
        offsets = self.journal.rewrite(iter(self))
        chunks = self.chunks
        for position, offset in enumerate(offsets):
            chunks.offsets[position] = offset
            chunks.flags[position] &= ~_RENAMED


def request_digester(model: str, settings: GenerationSettings, schema: dict) -> Callable[[Sequence[dict]], bytes]:
    """The cache key of a run's requests, as KEY_BYTES bytes: any change of model, prompt, sampling
    parameters or schema changes it. Everything but the messages is the same for the whole run, so it is
    hashed once."""
    fixed = {
        "model": model,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "seed": settings.seed,
        "schema": schema,
        "prompt_version": settings.prompt_version,
    }
    prefix = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode("utf-8"))

    def key(messages: Sequence[dict]) -> bytes:
        digest = prefix.copy()
        digest.update(json.dumps(list(messages), sort_keys=True).encode("utf-8"))
        return digest.digest()[:KEY_BYTES]

    return key


def request_hasher(model: str, settings: GenerationSettings, schema: dict) -> Callable[[Sequence[dict]], str]:
    """The cache key of a run's requests as the journal writes it (32 hex digits; see `request_digester`)."""
    digest = request_digester(model, settings, schema)
    return lambda messages: digest(messages).hex()


def request_hash(model: str, messages: Sequence[dict], settings: GenerationSettings, schema: dict) -> str:
    """The cache key of one request (see `request_hasher`)."""
    return request_hasher(model, settings, schema)(messages)


def result_from_outcome(
    task: ChunkTask,
    key: str,
    model: str,
    outcome: ChatOutcome,
    max_tokens: int | None = None,
    settings: GenerationSettings | None = None,
    temperature: float | None = None,
) -> ChunkResult:
    """A journal record for one chunk: validated pairs (one per requested type of `settings`, in order),
    or the reason there are none. `max_tokens` and `temperature` are those the request was sent with."""
    settings = settings or GenerationSettings()
    common = {
        "document": task.document,
        "chunk_id": task.chunk_id,
        "request_hash": key,
        "attempts": outcome.attempts,
        "model": model,
        "endpoint": outcome.endpoint,
        "latency_s": outcome.latency_s,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "prompt_version": settings.prompt_version,
        "finished_at": datetime.now(UTC),
        "http_status": outcome.status,
        "max_tokens_used": max_tokens,
        "temperature": temperature,
    }
    if not outcome.ok:
        return ChunkResult(ok=False, reason=outcome.failure_reason, detail=outcome.error, **common)
    try:
        pairs = settings.parse(task, outcome.content, outcome.finish_reason)
    except ParseError as error:
        return ChunkResult(ok=False, reason=error.reason, detail=error.detail, **common)
    return ChunkResult(ok=True, pairs=pairs, **common)


@dataclass
class _Spent:
    """What the requests for one chunk cost, over every ask."""

    asks: int = 0
    attempts: int = 0
    latency_s: float = 0.0
    output_tokens: int = 0

    def add(self, outcome: ChatOutcome) -> None:
        self.asks += 1
        self.attempts += outcome.attempts
        self.latency_s += outcome.latency_s
        self.output_tokens += outcome.completion_tokens


class _LostToOutage(Exception):
    """A chunk whose request ran out of retries while no endpoint answered, and none came back in time."""

    def __init__(self, result: ChunkResult, output_tokens: int, error: ServerUnavailableError):
        super().__init__(str(error))
        self.result, self.output_tokens, self.error = result, output_tokens, error


def _interrupted(progress: Progress, abandoned: int) -> GenerationInterrupted:
    return GenerationInterrupted(
        f"stopped on request after {progress.done}/{progress.total} chunks"
        + (f" ({abandoned} requests in flight abandoned)" if abandoned else "")
        + "; finished chunks are saved and the next run resumes from there"
    )


class Generator:
    """Sends every chunk that has no finished result yet, through the dispatch loop, as fast as the limit allows."""

    def __init__(
        self,
        client: LLMClient,
        layout: DataLayout,
        settings: GenerationSettings,
        limiter: ConcurrencyLimit,
        log: Callable[[str], None] = print,
        progress_interval_s: float = 10.0,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        telemetry_interval_s: float = 1.0,
        force: bool = False,
        parse_retries: int = 1,
        stop_grace_s: float = 30.0,
    ):
        self.client = client
        self.layout = layout
        self.settings = settings
        self.limiter = limiter
        self.log = log
        self.progress_interval_s = progress_interval_s
        self.stall_timeout_s = stall_timeout_s
        self.telemetry_interval_s = telemetry_interval_s
        self.force = force
        self.parse_retries = parse_retries
        self.stop_grace_s = stop_grace_s
        self.schema = settings.schema()

    async def run(
        self,
        tasks: Iterable[ChunkTask],
        stop: asyncio.Event | None = None,
        on_document_done: Callable[[str, Sequence[ChunkResult]], Awaitable[None]] | None = None,
    ) -> GenerationReport:
        """Generates what is not in the journal yet; returns every chunk's result, per document.

        `tasks` is read twice (a list, or `ChunkTasks` reading the chunks tables in batches): once to
        know which chunks the journal lacks, once to send them, their prompts built as they go out. So
        memory holds the requests in flight and a request hash per chunk, whatever the documents' size;
        the results stay in the journals and are read back from there (`DocumentResults`).

        `on_document_done(document, results)` runs as soon as a document's last chunk has its result
        (at once for a document with nothing to send), alongside the rest of the queue: a run over
        many documents writes each one's tables while the server works on the others.
        """
        model = self.client.model or await self.client.resolve_model()
        digest_of = request_digester(model, self.settings, self.schema)
        by_document: dict[str, DocumentChunks] = {}
        for task in tasks:
            chunks = by_document.get(task.document)
            if chunks is None:
                chunks = by_document[task.document] = DocumentChunks(task.document)
            chunks.add(task.chunk_id, digest_of(self.settings.messages_for(task)))
        documents = sorted(by_document)
        journals = {d: Journal(self.layout.journal_file(d, self.settings.table)) for d in documents}
        total = repeats = sending = 0
        unfinished: dict[str, int] = {}
        for document in documents:
            unfinished[document], repeated = by_document[document].plan(journals[document], self.force)
            total += len(by_document[document])
            repeats += repeated
            sending += unfinished[document]

        def todo() -> Iterator[tuple[ChunkTask, list[dict[str, str]], str, int]]:
            """The chunks to send, in the order of `tasks`, each prompt built as it goes out (its request
            hash is the one the first pass took, found by the chunk's position in its document)."""
            positions = dict.fromkeys(documents, 0)
            for task in tasks:
                chunks = by_document.get(task.document)
                position = positions.get(task.document, 0)
                if chunks is None or position >= len(chunks) or chunks.chunk_ids[position] != task.chunk_id:
                    raise RuntimeError(
                        f"the chunks of {task.document!r} changed while this run read them (chunk {task.chunk_id} "
                        "was not there, or not at this place, on the first pass); finished chunks are saved: "
                        "re-run to generate the rest from the current chunks"
                    )
                positions[task.document] = position + 1
                if chunks.flags[position] & _SEND:
                    yield task, self.settings.messages_for(task), chunks.key(position), position

        table = self.settings.table
        label = f"{table} {documents[0]}" if len(documents) == 1 else f"{table} ({len(documents)} documents)"
        progress = Progress(label, total - repeats, self.log, self.progress_interval_s)
        for _ in range(total - sending - repeats):
            progress.advance(cached=True)
        report = GenerationReport(results={}, cached=total - sending - repeats)
        self.log(
            f"{label}: {total} chunks, {report.cached} already done (journal/cache), "
            + (f"{repeats} repeating another chunk's text, " if repeats else "")
            + f"{sending} to send to {', '.join(e.base_url for e in self.client.endpoints)} "
            f"(model {model}, concurrency {self.limiter.limit})"
        )

        def current(document: str) -> DocumentResults:
            """The document's results in chunk order, read from its journal when asked for."""
            return DocumentResults(journals[document], by_document[document])

        hooks: list[asyncio.Task] = []

        def hand_over(document: str) -> None:
            if on_document_done is not None:
                hooks.append(asyncio.create_task(on_document_done(document, current(document))))

        def chunk_done(document: str) -> None:
            unfinished[document] -= 1
            if unfinished[document] == 0:
                hand_over(document)

        for document in documents:
            if not unfinished[document]:  # nothing to send: its results are all in the journal
                hand_over(document)
        started = time.monotonic()
        stop = stop or asyncio.Event()
        abandon = asyncio.Event()
        try:
            with ExitStack() as stack:
                # Entered first, left last: a signal is passed on only after the journals are closed.
                stack.enter_context(stop_on_signals(stop, abandon, self.log))
                stack.enter_context(self.client.log_to(self.log))
                for journal in journals.values():
                    stack.enter_context(journal)
                await self._dispatch(todo(), model, journals, by_document, progress, report, stop, abandon, chunk_done)
            report.duration_s = time.monotonic() - started
            report.output_tokens = progress.output_tokens
            await asyncio.gather(*hooks)
        finally:
            await asyncio.gather(*hooks, return_exceptions=True)  # none is left running on the way out

        for document, journal in journals.items():
            results = current(document)
            # Compact: the journal keeps the document's current chunks only.
            if results.renamed() or not results.are_the_whole_journal():
                results.rewrite()
            report.results[document] = current(document)
        if sending:
            progress.finish()
        return report

    async def _dispatch(self, todo, model, journals, by_document, progress, report, stop, abandon, chunk_done) -> None:
        """Sends every chunk through the dispatch loop, journaling each result as it comes."""
        endpoints = ", ".join(e.base_url for e in self.client.endpoints)
        dispatcher = Dispatcher(
            self.limiter,
            stop=stop,
            abandon=abandon,
            stop_grace_s=self.stop_grace_s,
            stall_timeout_s=self.stall_timeout_s,
            stall_message=lambda in_flight: (
                f"STALLED: no chunk finished in {self.stall_timeout_s:g} s "
                f"({progress.done}/{progress.total} done, {in_flight} requests in flight to {endpoints}). "
                "Finished chunks are saved; check the server and re-run to resume."
            ),
            log=self.log,
        )

        lost: list[ChunkResult] = []

        async def ask(item) -> tuple[ChunkResult, int]:
            task, messages, key, position = item
            report.sent += 1
            try:
                return await self._ask(task, messages, key, model)
            except _LostToOutage as outage:
                # Saved as failed (the next run sends it again); the outage is said once, by the run's error.
                offset = journals[task.document].append(outage.result)
                by_document[task.document].settle(position, offset, task.chunk_id)
                progress.advance(failed=True, output_tokens=outage.output_tokens)
                lost.append(outage.result)
                raise outage.error from None

        def answered(item, answer: tuple[ChunkResult, int]) -> None:
            (task, _, _, position), (result, output_tokens) = item, answer
            offset = journals[task.document].append(result)
            by_document[task.document].settle(position, offset, result.chunk_id)
            chunk_done(task.document)
            progress.advance(failed=not result.ok, output_tokens=output_tokens)
            if not result.ok:
                self.log(f"chunk {task.chunk_id} of {task.document} failed: {result.reason}: {result.detail}")

        monitor = asyncio.create_task(self._monitor(dispatcher.gate, progress, report, started=time.monotonic()))
        try:
            dispatched = await dispatcher.run(todo, ask, on_done=answered)
        except StorageFullError as error:
            # The first write that failed stopped the sending; say roughly how much room the rest needs.
            needed = journal_space_needed(journals.values(), progress.total - progress.done)
            more = f" The rest of the run needs about {format_bytes(needed)} for its journals." if needed else ""
            raise StorageFullError(error.errno, f"{error} ({progress.done}/{progress.total} chunks saved){more}") from None
        except ServerUnavailableError as error:
            failed = f", {len(lost)} of them as {lost[0].reason} after their retries ran out" if lost else ""
            raise ServerUnavailableError(
                f"{error}. Finished chunks are saved ({progress.done}/{progress.total}{failed}); "
                "start the server (or fix QA_PIPELINE_LLM_BASE_URL) and re-run to resume."
            ) from None
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        if dispatched.stopped or progress.done < progress.total:
            raise _interrupted(progress, dispatched.abandoned)

    async def _ask(self, task: ChunkTask, messages, key: str, model: str) -> tuple[ChunkResult, int]:
        """The result for one chunk and the output tokens it cost.

        An answer the parser rejects (invalid JSON, a missing field, cut by max_tokens) is asked
        again up to `parse_retries` times, with another seed and, if decoding is greedy, a sampling
        temperature, since the same request would get the same answer; an answer cut by max_tokens
        with a larger budget too (see `_larger_budget`). The record keeps the original request hash:
        it answers that request, and a re-run finds it in the cache.
        """
        spent, budget = _Spent(), self.settings.max_tokens
        for ask in range(self.parse_retries + 1):
            temperature, seed = self.settings.temperature, self.settings.seed
            if ask:
                temperature = temperature or REASK_TEMPERATURE
                seed = None if seed is None else seed + ask
            outcome = await self._chat(task, key, model, messages, budget, temperature, seed, spent)
            result = result_from_outcome(task, key, model, outcome, budget, self.settings, temperature)
            if result.ok or result.reason not in REASKED_REASONS:
                break
            if result.reason == FailureReason.TRUNCATED:
                budget = self._larger_budget(budget, outcome.prompt_tokens)
        if spent.asks == 1:
            return result, spent.output_tokens  # asked once: the record already has the outcome's figures
        update: dict = {"attempts": spent.attempts, "latency_s": spent.latency_s}
        if not result.ok and ask:
            update["detail"] = f"{result.detail} (asked {ask + 1} times)"
        return result.model_copy(update=update), spent.output_tokens

    async def _chat(
        self, task: ChunkTask, key: str, model: str, messages, max_tokens: int, temperature: float,
        seed: int | None, spent: _Spent,
    ) -> ChatOutcome:
        """One ask. A request whose retries ran out while no endpoint answered is sent again once one
        does; if none does within the client's outage timeout, the chunk is lost to the outage."""
        while True:
            outcome = await self.client.chat(
                messages, response_format=self.settings.schema_for(task) or self.schema, max_tokens=max_tokens,
                temperature=temperature, seed=seed,
            )
            self.limiter.observe_response(outcome.latency_s, outcome.ok, outcome.completion_tokens)
            spent.add(outcome)
            if outcome.outage is None:
                return outcome
            try:
                if not await self.client.wait_out(outcome.outage):
                    return outcome  # the server was up: a connection it dropped is this chunk's failure
            except ServerUnavailableError as error:
                result = result_from_outcome(task, key, model, outcome, max_tokens, self.settings, temperature)
                result = result.model_copy(update={"attempts": spent.attempts, "latency_s": spent.latency_s})
                raise _LostToOutage(result, spent.output_tokens, error) from None

    def _larger_budget(self, budget: int, prompt_tokens: int) -> int:
        """The max_tokens for re-asking an answer cut at `budget`: twice as many, up to MAX_BUDGET_GROWTH
        times the configured max_tokens and within the model's context (max_model_len as the server
        reports it, less the prompt's tokens when the server counted them)."""
        ceiling = MAX_BUDGET_GROWTH * self.settings.max_tokens
        if self.client.max_model_len is not None:
            ceiling = min(ceiling, self.client.max_model_len - prompt_tokens)
        return max(budget, min(2 * budget, ceiling))

    async def _monitor(self, gate: ConcurrencyGate, progress: Progress, report: GenerationReport, started) -> None:
        """Samples load and server metrics for the run's metadata and the concurrency controller."""
        while True:
            metrics = await self.client.metrics()
            elapsed = time.monotonic() - started
            self.limiter.observe_metrics(metrics, elapsed)
            await gate.limit_changed()
            report.telemetry.append(
                TelemetrySample(
                    elapsed_s=elapsed,
                    done=progress.done,
                    in_flight=gate.in_flight,
                    limit=self.limiter.limit,
                    output_tokens=progress.output_tokens,
                    server_running=metrics.running if metrics else None,
                    server_waiting=metrics.waiting if metrics else None,
                    kv_cache_usage=metrics.kv_cache_usage if metrics else None,
                )
            )
            await asyncio.sleep(self.telemetry_interval_s)

