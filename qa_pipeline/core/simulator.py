"""A simulated vLLM server for tests and benchmarks: the OpenAI-compatible HTTP API and vLLM metrics,
with a continuous-batching capacity model that knows its own ceiling, and fault injection."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from qa_pipeline.core.prompts import PASSAGE_OPEN, QAPairSet, extract_passage

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
LISTENING_PREFIX = "simulator listening on "
DEFAULT_MODEL_NAME = "sim-model"


class FaultKind(StrEnum):
    """What can go wrong with one request."""

    HTTP_500 = "500"
    HTTP_502 = "502"
    HTTP_503 = "503"
    HTTP_429 = "429"
    HANG = "hang"
    RESET = "reset"
    MALFORMED = "malformed"
    MISSING_FIELD = "missing_field"
    TRUNCATE = "truncate"


class FaultConfig(BaseModel):
    """Fault injection; the body of POST /simulator/faults, which replaces it as a whole."""

    model_config = ConfigDict(extra="forbid")

    fault_rate: float = Field(0.0, ge=0.0, le=1.0, description="probability that a request gets a fault")
    fault_kinds: list[FaultKind] = Field(
        default_factory=lambda: list(FaultKind), description="faults to draw from, comma-separated"
    )
    fault_seed: int = Field(0, description="seed of the fault draws, taken in arrival order")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of 429 answers, seconds")
    hang_s: float = Field(600.0, gt=0, description="seconds a hanging request holds its connection before dropping it")
    fail_if_contains: list[str] = Field(
        default_factory=list, description="prompts containing this text get HTTP 500; repeatable"
    )
    api_key: str | None = Field(None, description="if set, /v1 requests need `Authorization: Bearer <key>`")

    @model_validator(mode="after")
    def _kinds_when_faulting(self) -> FaultConfig:
        if self.fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind in fault_kinds")
        return self


class SimulatorConfig(FaultConfig):
    """Every simulator option; the fault options are inherited so the CLI, this model and
    POST /simulator/faults share one set of names."""

    port: int = Field(0, ge=0, le=65535, description="port on 127.0.0.1; 0 picks a free one")
    served_model_name: list[str] = Field(
        default_factory=lambda: [DEFAULT_MODEL_NAME],
        min_length=1,
        description="model names to serve (vLLM --served-model-name)",
    )
    max_num_seqs: int = Field(64, ge=1, description="sequences decoded together (vLLM --max-num-seqs)")
    step_base_ms: float = Field(10.0, ge=0, description="fixed cost of one decode step, ms")
    step_per_seq_ms: float = Field(0.25, ge=0, description="added cost of one decode step per running sequence, ms")
    zero_latency: bool = Field(False, description="answer at once, without the capacity model")
    output_tokens_mean: float = Field(300.0, gt=0, description="mean output length (lognormal), tokens")
    output_tokens_sigma: float = Field(0.8, ge=0, description="lognormal shape of the output length (its tail)")
    output_tokens_min: int = Field(16, ge=1, description="shortest output, tokens")
    output_tokens_max: int = Field(2048, ge=1, description="longest output, tokens")
    kv_cache_tokens: int = Field(131072, ge=1, description="tokens the KV cache holds across running sequences")
    max_model_len: int = Field(32768, ge=1, description="longest prompt plus max_tokens accepted, tokens")

    @model_validator(mode="after")
    def _output_range(self) -> SimulatorConfig:
        if self.output_tokens_min > self.output_tokens_max:
            raise ValueError(
                f"output_tokens_min ({self.output_tokens_min}) is above output_tokens_max ({self.output_tokens_max})"
            )
        return self

    @property
    def instant(self) -> bool:
        return self.zero_latency or (self.step_base_ms == 0 and self.step_per_seq_ms == 0)

    @property
    def ceiling_output_tokens_per_s(self) -> float | None:
        """Output tokens per second with every slot busy; None when answers are instant."""
        if self.instant:
            return None
        return self.max_num_seqs / ((self.step_base_ms + self.step_per_seq_ms * self.max_num_seqs) / 1000)

    def fault_config(self) -> FaultConfig:
        return FaultConfig.model_validate(self.model_dump(include=set(FaultConfig.model_fields)))


# ---------------------------------------------------------------------------------------------
# Content: a JSON instance of the requested schema, with strings taken from the passage.


class SchemaError(ValueError):
    """The response_format schema uses something the simulator cannot generate."""


@dataclass(frozen=True)
class _Material:
    """Sentences of one passage; a short topic phrase is taken from one when a value needs it."""

    sentences: tuple[str, ...]

    def sentence(self, index: int) -> str:
        return self.sentences[index % len(self.sentences)]

    def topic(self, index: int) -> str:
        return _topic(self.sentence(index))


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’_-]*")
_LEADING_STOPWORDS = frozenset(
    "a an and as at but by for from how if in is it its of on or so that the then these this those to "
    "we what when where which while who why with you your".split()
)
_PHRASE_BREAKS = frozenset(
    "is are was were be been has have had can could will would should may might must does do did "
    "of in on at to for with by from into about than that which who and or but".split()
)


def _material(passage: str) -> _Material:
    units = [unit.strip() for unit in _SENTENCE_BREAK.split(passage)]
    sentences = [unit for unit in units if _counts_words(unit, 3)] or [unit for unit in units if unit]
    if not sentences:
        sentences = ["The passage is empty."]
    return _Material(tuple(sentences))


def _counts_words(text: str, count: int) -> bool:
    return sum(1 for _ in itertools.islice(_WORD.finditer(text), count)) == count


def _topic(sentence: str) -> str:
    """The sentence's leading phrase, cut before its first verb or preposition when it has a common one."""
    words: list[str] = []
    skipped = None  # a sentence of stopwords only keeps its last one
    for match in _WORD.finditer(sentence):
        word = match.group()
        if words or word.lower() not in _LEADING_STOPWORDS:
            words.append(word)
            if len(words) == 5:
                break
        else:
            skipped = word
    if not words and skipped:
        words = [skipped]
    end = next((i for i, word in enumerate(words) if i > 0 and word.lower() in _PHRASE_BREAKS), 5)
    return " ".join(words[:end]) or "the passage"


_QUESTION_TEMPLATES = {
    "factual": "What does the passage say about {topic}?",
    "conceptual": "How does the passage explain {topic}?",
    "comparison": "How does {topic} compare with {other} according to the passage?",
}
_QUESTION_FIELD = re.compile(r"question|query|prompt", re.IGNORECASE)
_FORMAT_EXAMPLES = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "someone@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
# Arrays without an enum to enumerate get this many items (within minItems/maxItems).
_DEFAULT_ARRAY_ITEMS = 3
# Recursive schemas stop growing here: deeper objects keep only required fields, arrays minItems.
_MAX_DEPTH = 6


@dataclass
class _Draw:
    """Where in the instance a value is generated: which array item, under which enum value, how deep."""

    material: _Material
    item: int = 0
    kind: str | None = None
    depth: int = 0
    strings: int = 0


_Generate = Callable[[_Draw], Any]


class _SchemaCompiler:
    """Turns a JSON schema into a function that generates an instance of it."""

    def __init__(self, root: Any):
        self.root = root
        self.refs: dict[tuple[str, str], _Generate] = {}

    def compile(self, node: Any, name: str = "") -> _Generate:
        if not isinstance(node, dict):
            return self._string({}, name)  # `true` accepts anything
        if "$ref" in node:
            return self._ref(node["$ref"], name)
        if "allOf" in node:
            merged = {key: value for key, value in node.items() if key != "allOf"}
            for part in node["allOf"]:
                merged = {**self.resolve(part), **merged}
            return self.compile(merged, name)
        if "const" in node:
            constant = node["const"]
            return lambda draw: constant
        if "enum" in node:
            return self._enum(list(node["enum"]))
        for key in ("anyOf", "oneOf"):
            if key in node:
                options = [option for option in node[key] if self.resolve(option).get("type") != "null"]
                return self.compile((options or node[key])[0], name)
        kind = node.get("type")
        if isinstance(kind, list):
            kind = next((each for each in kind if each != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in node else "array" if "items" in node else "string"
        builders = {
            "object": self._object,
            "array": self._array,
            "string": self._string,
            "integer": self._integer,
            "number": self._number,
            "boolean": self._boolean,
            "null": self._null,
        }
        if kind not in builders:
            raise SchemaError(f"unsupported JSON schema type {kind!r}")
        return builders[kind](node, name)

    def resolve(self, node: Any) -> dict:
        """The schema a node stands for, following $ref."""
        seen = set()
        while isinstance(node, dict) and "$ref" in node and node["$ref"] not in seen:
            seen.add(node["$ref"])
            node = self._lookup(node["$ref"])
        return node if isinstance(node, dict) else {}

    def _lookup(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise SchemaError(f"only local $ref (starting with '#') are supported, got {ref!r}")
        node = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise SchemaError(f"$ref {ref!r} points to nothing in the schema")
            node = node[part]
        return node

    def _ref(self, ref: str, name: str) -> _Generate:
        key = (ref, name)
        refs = self.refs
        if key not in refs:
            # A recursive schema meets this ref again while compiling it: the lambda below
            # looks the generator up only when called, by which time it is in place.
            refs[key] = self._unfinished
            refs[key] = self.compile(self._lookup(ref), name)
        return lambda draw: refs[key](draw)

    @staticmethod
    def _unfinished(draw: _Draw) -> Any:
        raise SchemaError("a $ref was used before it was compiled")

    def _enum_width(self, node: Any) -> int | None:
        """How many values an array item can take: its own enum, or the enum of its first enum field."""
        node = self.resolve(node)
        if "enum" in node:
            return len(node["enum"])
        for sub in node.get("properties", {}).values():
            if "enum" in self.resolve(sub):
                return len(self.resolve(sub)["enum"])
        return None

    @staticmethod
    def _enum(values: list[Any]) -> _Generate:
        def generate(draw: _Draw) -> Any:
            return draw.kind if draw.kind in values else values[draw.item % len(values)]

        return generate

    def _object(self, node: dict, name: str) -> _Generate:
        properties: dict[str, Any] = node.get("properties", {})
        required = set(node.get("required", properties))
        fields = [(prop, self.compile(sub, prop), prop in required) for prop, sub in properties.items()]
        # The first enum field (a question type, say) is drawn first so sibling strings can follow it.
        kind_field = next((prop for prop, sub in properties.items() if "enum" in self.resolve(sub)), None)
        kind_generate = dict((prop, generate) for prop, generate, _ in fields).get(kind_field)

        def generate(draw: _Draw) -> dict[str, Any]:
            inner = _Draw(draw.material, draw.item, None, draw.depth + 1)
            if kind_generate is not None:
                inner.kind = kind_generate(inner)
            shallow = draw.depth < _MAX_DEPTH
            return {
                prop: inner.kind if prop == kind_field else each(inner)
                for prop, each, needed in fields
                if needed or shallow
            }

        return generate

    def _array(self, node: dict, name: str) -> _Generate:
        items = node.get("items", {})
        low = int(node.get("minItems", 0))
        wanted = self._enum_width(items) or _DEFAULT_ARRAY_ITEMS
        if "maxItems" in node:
            wanted = min(wanted, int(node["maxItems"]))
        count = max(low, wanted)
        item = self.compile(items, name)

        def generate(draw: _Draw) -> list[Any]:
            n = count if draw.depth < _MAX_DEPTH else low
            return [item(_Draw(draw.material, index, None, draw.depth + 1)) for index in range(n)]

        return generate

    @staticmethod
    def _string(node: dict, name: str) -> _Generate:
        low = int(node.get("minLength", 0))
        high = node.get("maxLength")
        example = _FORMAT_EXAMPLES.get(node.get("format", ""))
        question = bool(_QUESTION_FIELD.search(name))

        def generate(draw: _Draw) -> str:
            if example is not None:
                return example
            if question:
                template = _QUESTION_TEMPLATES.get(draw.kind or "factual", _QUESTION_TEMPLATES["factual"])
                text = template.format(topic=draw.material.topic(draw.item), other=draw.material.topic(draw.item + 1))
            else:
                # The first plain string of an object is the sentence its question was built from.
                text = draw.material.sentence(draw.item + draw.strings)
                draw.strings += 1
            while len(text) < low:
                text = f"{text} {text}"
            return text if high is None else text[: int(high)]

        return generate

    @staticmethod
    def _bounds(node: dict, step: float) -> tuple[float | None, float | None]:
        low, high = node.get("minimum"), node.get("maximum")
        if "exclusiveMinimum" in node:
            bound = node["exclusiveMinimum"] + step
            low = bound if low is None else max(low, bound)
        if "exclusiveMaximum" in node:
            bound = node["exclusiveMaximum"] - step
            high = bound if high is None else min(high, bound)
        return low, high

    def _integer(self, node: dict, name: str) -> _Generate:
        low, high = self._bounds(node, 1)

        def generate(draw: _Draw) -> int:
            return int(_clamp(draw.item + 1, low, high))

        return generate

    def _number(self, node: dict, name: str) -> _Generate:
        low, high = self._bounds(node, 0.5)

        def generate(draw: _Draw) -> float:
            return float(_clamp(draw.item + 0.5, low, high))

        return generate

    @staticmethod
    def _boolean(node: dict, name: str) -> _Generate:
        return lambda draw: draw.item % 2 == 0

    @staticmethod
    def _null(node: dict, name: str) -> _Generate:
        return lambda draw: None


def _clamp(value: float, low: float | None, high: float | None) -> float:
    if low is not None:
        value = max(value, low)
    if high is not None:
        value = min(value, high)
    return value


@lru_cache(maxsize=256)
def _schema_generator(schema_key: str) -> _Generate:
    """The generator for a schema, compiled once per distinct schema text."""
    schema = json.loads(schema_key)
    return _SchemaCompiler(schema).compile(schema)


@lru_cache(maxsize=4096)
def _render(schema_key: str, passage: str) -> str:
    """The JSON answer for one passage; cached because clients re-send the same chunks."""
    return json.dumps(_schema_generator(schema_key)(_Draw(_material(passage))), ensure_ascii=False)


_QA_SCHEMA_KEY = json.dumps(QAPairSet.model_json_schema())


def _drop_a_field(value: Any) -> Any:
    """The instance with one field missing: "answer" (else the first field) of the first object in an array."""
    target = _first_item_object(value) or (value if isinstance(value, dict) else None)
    if target:
        target.pop("answer" if "answer" in target else next(iter(target)))
    return value


def _first_item_object(value: Any) -> dict | None:
    if isinstance(value, list):
        for element in value:
            if isinstance(element, dict) and element:
                return element
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        found = _first_item_object(child)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# Capacity: continuous batching on a wall-clock engine loop.

# The engine wakes at most this often and advances several decode steps at once, so short steps
# cost few wake-ups; arrivals join at the next wake-up as vLLM admits them at step boundaries.
_TICK_S = 0.005
_MAX_LAG_S = 0.1


@dataclass(eq=False)
class _Sequence:
    prompt_tokens: int
    target_tokens: int
    done: asyncio.Future[None]
    generated: int = 0


class _Engine:
    """Up to max_num_seqs sequences decode together, one token each per step; the rest wait.
    A step takes step_base + step_per_seq * batch size, so throughput rises with concurrency and saturates."""

    def __init__(self, config: SimulatorConfig):
        self.instant = config.instant
        self.max_num_seqs = config.max_num_seqs
        self.step_base_s = config.step_base_ms / 1000
        self.step_per_seq_s = config.step_per_seq_ms / 1000
        self.kv_cache_tokens = config.kv_cache_tokens
        self.running: list[_Sequence] = []
        self.waiting: deque[_Sequence] = deque()
        self.kv_reserved = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.peak_running = 0
        self.peak_waiting = 0
        self._wakeup = asyncio.Event()

    def kv_cache_usage(self) -> float:
        held = sum(seq.prompt_tokens + seq.generated for seq in self.running)
        return min(1.0, held / self.kv_cache_tokens)

    def reset_peaks(self) -> None:
        self.peak_running = len(self.running)
        self.peak_waiting = len(self.waiting)

    async def generate(self, prompt_tokens: int, output_tokens: int) -> None:
        """Returns once the sequence has decoded output_tokens; cancelling it frees its slot."""
        if self.instant:
            self.prompt_tokens_total += prompt_tokens
            self.generation_tokens_total += output_tokens
            return
        seq = _Sequence(prompt_tokens, output_tokens, asyncio.get_running_loop().create_future())
        self.waiting.append(seq)
        self.peak_waiting = max(self.peak_waiting, len(self.waiting))
        self._wakeup.set()
        try:
            await seq.done
        except asyncio.CancelledError:
            self._abort(seq)
            raise

    def _abort(self, seq: _Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.kv_reserved -= seq.prompt_tokens + seq.target_tokens
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            needed = seq.prompt_tokens + seq.target_tokens
            # A sequence waits while the KV cache cannot hold it, unless it would run alone.
            if self.running and self.kv_reserved + needed > self.kv_cache_tokens:
                break
            self.waiting.popleft()
            self.running.append(seq)
            self.kv_reserved += needed
            self.prompt_tokens_total += seq.prompt_tokens
        self.peak_running = max(self.peak_running, len(self.running))

    async def run(self) -> None:
        if self.instant:
            return
        loop = asyncio.get_running_loop()
        clock = loop.time()
        while True:
            self._admit()
            if not self.running:
                self._wakeup.clear()
                await self._wakeup.wait()
                clock = loop.time()
                continue
            step_s = self.step_base_s + self.step_per_seq_s * len(self.running)
            remaining = min(seq.target_tokens - seq.generated for seq in self.running)
            steps = min(remaining, max(1, math.ceil(_TICK_S / step_s)))
            # An ideal clock, not "now + step": sleep overshoot must not eat into the ceiling. Lag beyond
            # _MAX_LAG_S (a paused process, a starved CPU) is dropped rather than replayed as a burst.
            clock = max(clock, loop.time() - _MAX_LAG_S) + steps * step_s
            await asyncio.sleep(clock - loop.time())
            self.generation_tokens_total += steps * len(self.running)
            still_running = []
            for seq in self.running:
                seq.generated += steps
                if seq.generated < seq.target_tokens:
                    still_running.append(seq)
                    continue
                self.kv_reserved -= seq.prompt_tokens + seq.target_tokens
                if not seq.done.done():
                    seq.done.set_result(None)
            self.running = still_running


# ---------------------------------------------------------------------------------------------
# The HTTP server.


@dataclass
class _Stats:
    """Counters of GET /simulator/stats; POST /simulator/reset-stats starts them again."""

    started: float = field(default_factory=time.monotonic)
    requests_total: int = 0
    completed: int = 0
    aborted: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    output_tokens_total: int = 0
    prompt_tokens_total: int = 0
    requests_by_passage: Counter[str] = field(default_factory=Counter)


class _ConnectionDropped(Exception):
    """The connection was closed without an answer (hang and reset faults)."""


class _BadRequest(Exception):
    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.response = _error(status, error_type, message)


def _error(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error in vLLM's OpenAI-style shape."""
    body = {"error": {"message": message, "type": error_type, "code": status}}
    return web.json_response(body, status=status, headers=headers)


_BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


def passage_key(passage: str) -> str:
    """The key of `requests_by_passage` in the stats: sha256 hex of the passage text, first 16 characters."""
    return hashlib.sha256(passage.encode("utf-8")).hexdigest()[:16]


def _message_texts(messages: Any) -> list[str]:
    """The text of each chat message (string content, or a list of text parts)."""
    if not isinstance(messages, list) or not messages:
        raise _BadRequest(400, "BadRequestError", "`messages` must be a non-empty list")
    parts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise _BadRequest(400, "BadRequestError", "every message needs a string `content`")
        parts.append(content)
    return parts


class _Simulator:
    """The request handlers and the state they share."""

    def __init__(self, config: SimulatorConfig):
        self.config = config
        self.engine = _Engine(config)
        self.models = set(config.served_model_name)
        self.model_label = f'model_name="{_label_value(config.served_model_name[0])}"'
        self.stats = _Stats()
        self.success: Counter[str] = Counter({"stop": 0, "length": 0})
        self.completions = 0
        self._recent_schemas: list[tuple[dict, str]] = []
        self.set_faults(config.fault_config())

    def set_faults(self, faults: FaultConfig) -> None:
        self.faults = faults
        self.fault_random = random.Random(faults.fault_seed)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models_list)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        app.router.add_get("/simulator/stats", self.stats_json)
        app.router.add_post("/simulator/faults", self.replace_faults)
        app.router.add_post("/simulator/reset-stats", self.reset_stats)
        app.cleanup_ctx.append(self._engine_loop)
        return app

    async def _engine_loop(self, app: web.Application):
        task = asyncio.create_task(self.engine.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        key = self.faults.api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return None

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def models_list(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        created = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": name,
                "parent": None,
                "max_model_len": self.config.max_model_len,
            }
            for name in self.config.served_model_name
        ]
        return web.json_response({"object": "list", "data": data})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests_total += 1
        try:
            response = await self._chat(request)
        except _BadRequest as bad:
            response = bad.response
        except _ConnectionDropped:
            return web.Response()  # never sent: the transport is already closed
        except asyncio.CancelledError:
            # The client gave up (its timeout, or a hang fault): vLLM aborts such requests too.
            self.stats.aborted += 1
            raise
        self.stats.by_status[response.status] += 1
        if response.status == 200:
            self.stats.completed += 1
        return response

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            body = json.loads(await request.read())
        except ValueError as error:
            raise _BadRequest(400, "BadRequestError", f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, "BadRequestError", "the request body must be a JSON object")
        model = body.get("model")
        if model not in self.models:
            return _error(404, "NotFoundError", f"The model `{model}` does not exist.")
        if body.get("stream"):
            raise _BadRequest(400, "BadRequestError", "the simulator does not support stream=true")
        texts = _message_texts(body.get("messages"))
        prompt = "\n".join(texts)
        # Without passage markers, the last message is what the model is asked about.
        passage = extract_passage(prompt if PASSAGE_OPEN in prompt else texts[-1])
        self.stats.requests_by_passage[passage_key(passage)] += 1
        # About four characters per token, plus the chat template's few tokens per message.
        prompt_tokens = len(prompt) // 4 + 4 * len(body["messages"])
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise _BadRequest(400, "BadRequestError", f"max_tokens must be a positive integer, got {max_tokens!r}")
        if prompt_tokens + (max_tokens or 0) > self.config.max_model_len:
            raise _BadRequest(
                400,
                "BadRequestError",
                f"This model's maximum context length is {self.config.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + (max_tokens or 0)} tokens ({prompt_tokens} in the messages, {max_tokens or 0} in "
                "the completion). Please reduce the length of the messages or completion.",
            )

        if any(text in prompt for text in self.faults.fail_if_contains):
            self.stats.faults["fail_if_contains"] += 1
            return _error(500, "InternalServerError", "simulated failure: the prompt contains a fail_if_contains text")
        fault = self._draw_fault()
        if fault is not None:
            self.stats.faults[fault] += 1
            if (response := await self._http_fault(request, fault)) is not None:
                return response

        content, fenced = self._content(body.get("response_format"), passage)
        drawn = self._output_tokens(prompt)
        output_tokens = drawn
        if fault is FaultKind.TRUNCATE:
            drawn = max(drawn, 2)  # so that half of it is still a cut
            output_tokens = drawn // 2
        elif max_tokens is not None:
            output_tokens = min(drawn, max_tokens)
        await self.engine.generate(prompt_tokens, output_tokens)

        if fault is FaultKind.MALFORMED:
            content = "Sure! " + content.replace('"', "'")
        elif fault is FaultKind.MISSING_FIELD:
            content = json.dumps(_drop_a_field(json.loads(content)), ensure_ascii=False)
        if fenced:
            content = f"Here are the question/answer pairs for the passage.\n\n```json\n{content}\n```"
        finish_reason = "stop"
        if output_tokens < drawn:
            # Cut where a real server would stop: mid-JSON, in proportion to the tokens emitted.
            content = content[: len(content) * output_tokens // drawn]
            finish_reason = "length"
        return self._completion(model, content, finish_reason, prompt_tokens, output_tokens)

    def _draw_fault(self) -> FaultKind | None:
        faults = self.faults
        if faults.fault_rate and self.fault_random.random() < faults.fault_rate:
            return self.fault_random.choice(faults.fault_kinds)
        return None

    async def _http_fault(self, request: web.Request, fault: FaultKind) -> web.StreamResponse | None:
        """The answer for a fault that replaces the response; None for faults in the content."""
        if fault is FaultKind.HTTP_500:
            return _error(500, "InternalServerError", "simulated internal server error")
        if fault is FaultKind.HTTP_502:
            return web.Response(status=502, text=_BAD_GATEWAY_HTML, content_type="text/html")
        if fault is FaultKind.HTTP_503:
            return _error(503, "ServiceUnavailableError", "simulated: the server is overloaded or not ready yet")
        if fault is FaultKind.HTTP_429:
            headers = {"Retry-After": str(self.faults.retry_after_s)}
            return _error(429, "RateLimitError", "simulated: too many requests", headers=headers)
        if fault is FaultKind.HANG:
            await asyncio.sleep(self.faults.hang_s)
        if fault in (FaultKind.HANG, FaultKind.RESET):
            if request.transport is not None:
                request.transport.abort()
            raise _ConnectionDropped
        return None

    def _content(self, response_format: Any, passage: str) -> tuple[str, bool]:
        """The JSON answer, and whether to wrap it in prose and a code fence (no response_format asked)."""
        if response_format is None or response_format == {"type": "text"}:
            return _render(_QA_SCHEMA_KEY, passage), True
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            return _render(_QA_SCHEMA_KEY, passage), False
        if kind != "json_schema":
            raise _BadRequest(400, "BadRequestError", f"unsupported response_format: {response_format!r}")
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise _BadRequest(400, "BadRequestError", "response_format.json_schema.schema must be a JSON object")
        try:
            return _render(self._schema_key(schema), passage), False
        except SchemaError as error:
            raise _BadRequest(400, "BadRequestError", f"response_format schema: {error}") from None

    def _schema_key(self, schema: dict) -> str:
        """The schema's JSON text, which keys the generator cache; found by comparing with the schemas
        seen last, which is cheaper than serialising it on every request."""
        for known, key in self._recent_schemas:
            if known == schema:
                return key
        key = json.dumps(schema)
        self._recent_schemas = [(schema, key), *self._recent_schemas[:15]]
        return key

    def _output_tokens(self, prompt: str) -> int:
        """A lognormal draw seeded by the prompt, so the same request always has the same length."""
        config = self.config
        digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=16).digest()
        u1 = (int.from_bytes(digest[:8], "big") + 1) / 2**64
        u2 = int.from_bytes(digest[8:], "big") / 2**64
        normal = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
        sigma = config.output_tokens_sigma
        mu = math.log(config.output_tokens_mean) - sigma * sigma / 2
        return max(config.output_tokens_min, min(config.output_tokens_max, round(math.exp(mu + sigma * normal))))

    def _completion(
        self, model: str, content: str, finish_reason: str, prompt_tokens: int, output_tokens: int
    ) -> web.Response:
        self.completions += 1
        self.success[finish_reason] += 1
        self.stats.output_tokens_total += output_tokens
        self.stats.prompt_tokens_total += prompt_tokens
        body = {
            "id": f"chatcmpl-sim-{self.completions}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + output_tokens,
                "completion_tokens": output_tokens,
            },
        }
        return web.Response(text=json.dumps(body, ensure_ascii=False), content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        engine, label = self.engine, self.model_label
        ceiling = self.config.ceiling_output_tokens_per_s
        samples = [
            ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
             [(label, len(engine.running))]),
            ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
             [(label, len(engine.waiting))]),
            ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
             [(label, engine.kv_cache_usage())]),
            ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
             [(label, engine.prompt_tokens_total)]),
            ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
             [(label, engine.generation_tokens_total)]),
            ("vllm:request_success_total", "counter", "Count of successfully processed requests.",
             [(f'finished_reason="{reason}",{label}', count) for reason, count in self.success.items()]),
            ("simulator:ceiling_output_tokens_per_s", "gauge", "Output tokens per second with every slot busy.",
             [(label, math.inf if ceiling is None else ceiling)]),
        ]
        lines = []
        for name, kind, help_text, values in samples:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{{{labels}}} {_sample_value(value)}" for labels, value in values)
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")

    async def stats_json(self, request: web.Request) -> web.Response:
        stats, engine = self.stats, self.engine
        elapsed = time.monotonic() - stats.started
        config = self.config.model_copy(update=self.faults.model_dump()).model_dump(mode="json")
        if config["api_key"] is not None:
            config["api_key"] = "***"
        body = {
            "requests_total": stats.requests_total,
            "completed": stats.completed,
            "aborted": stats.aborted,
            "by_status": {str(status): count for status, count in sorted(stats.by_status.items())},
            "faults": dict(stats.faults),
            "output_tokens_total": stats.output_tokens_total,
            "prompt_tokens_total": stats.prompt_tokens_total,
            "elapsed_s": elapsed,
            "output_tokens_per_s": stats.output_tokens_total / elapsed if elapsed > 0 else 0.0,
            "ceiling_output_tokens_per_s": self.config.ceiling_output_tokens_per_s,
            "running": len(engine.running),
            "waiting": len(engine.waiting),
            "peak_running": engine.peak_running,
            "peak_waiting": engine.peak_waiting,
            "kv_cache_usage_perc": engine.kv_cache_usage(),
            "requests_by_passage": dict(stats.requests_by_passage),
            "config": config,
        }
        return web.json_response(body)

    async def replace_faults(self, request: web.Request) -> web.Response:
        try:
            faults = FaultConfig.model_validate_json(await request.read())
        except ValueError as error:
            return _error(422, "BadRequestError", f"invalid fault config: {error}")
        self.set_faults(faults)
        logger.info("fault config replaced: %s", faults.model_dump_json(exclude={"api_key"}))
        return web.json_response(faults.model_dump(mode="json", exclude={"api_key"}))

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats = _Stats()
        self.engine.reset_peaks()
        return web.json_response({"reset": True})


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_value(value: float) -> str:
    return "+Inf" if value == math.inf else repr(float(value))


# ---------------------------------------------------------------------------------------------
# Running it: CLI options, serve(), and a child process for tests and benchmarks.


def serve(config: SimulatorConfig) -> None:
    """Run the simulator on 127.0.0.1 until SIGINT or SIGTERM; prints the listening line once it accepts connections."""
    # An entry point: its start-up log (with the ceiling) must show unless the caller set logging up already.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(config))


async def _serve(config: SimulatorConfig) -> None:
    simulator = _Simulator(config)
    # keepalive_timeout=5 as vLLM's uvicorn: clients must cope with idle sockets being closed. On SIGTERM
    # in-flight requests get half a second, so a stopped simulator is gone at once, as tests expect.
    runner = web.AppRunner(
        simulator.app(), access_log=None, handler_cancellation=True, keepalive_timeout=5, shutdown_timeout=0.5
    )
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse the port at once
    sock.bind((HOST, config.port))
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ceiling = config.ceiling_output_tokens_per_s
    logger.info(
        "simulator serving %s: max_num_seqs=%d, step %.3g ms + %.3g ms/seq, ceiling %s output tokens/s",
        ", ".join(config.served_model_name),
        config.max_num_seqs,
        config.step_base_ms,
        config.step_per_seq_ms,
        "unbounded (zero latency)" if ceiling is None else f"{ceiling:.0f}",
    )
    print(f"{LISTENING_PREFIX}http://{HOST}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run_batch(input_path: str | Path, output_path: str | Path, config: SimulatorConfig | None = None) -> int:
    """Answer an OpenAI/vLLM batch input file as `vllm run-batch` does; returns the number of requests.

    Every request goes through the same handlers as the HTTP API (served on a loopback port while the
    batch runs, capacity model and faults included); the output has one line per request, in input
    order: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
    """
    return asyncio.run(_run_batch(Path(input_path), Path(output_path), config or SimulatorConfig()))


async def _run_batch(input_path: Path, output_path: Path, config: SimulatorConfig) -> int:
    requests = []
    for number, text in enumerate(input_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            request = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{input_path}:{number}: not a JSON line: {error}") from None
        if not isinstance(request, dict) or not {"custom_id", "url", "body"} <= request.keys():
            raise ValueError(f"{input_path}:{number}: a batch request needs custom_id, method, url and body")
        requests.append(request)

    runner = web.AppRunner(_Simulator(config).app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    await web.SockSite(runner, sock).start()
    base_url = f"http://{HOST}:{sock.getsockname()[1]}"
    # As vllm run-batch: at most twice max_num_seqs requests in flight.
    gate = asyncio.Semaphore(2 * config.max_num_seqs)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    async def answer(session: aiohttp.ClientSession, request: dict) -> dict:
        async with gate:
            try:
                async with session.request(request.get("method", "POST"), base_url + request["url"],
                                           json=request["body"]) as response:
                    status, text = response.status, await response.text()
            except aiohttp.ClientError as error:
                return _batch_output(request, 400, None, f"{type(error).__name__}: {error}")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if status == 200:
            return _batch_output(request, status, body, None)
        return _batch_output(request, status, None, body if body is not None else text)

    try:
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as session:
            lines = await asyncio.gather(*(answer(session, request) for request in requests))
    finally:
        await runner.cleanup()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(f".{output_path.name}.partial")
    partial.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    os.replace(partial, output_path)
    return len(lines)


def _batch_output(request: dict, status: int, body: Any, error: Any) -> dict:
    return {
        "id": f"vllm-{uuid.uuid4().hex}",
        "custom_id": request["custom_id"],
        "response": {"status_code": status, "request_id": f"vllm-batch-{uuid.uuid4().hex}", "body": body},
        "error": error,
    }


def _fault_kinds(text: str) -> list[FaultKind]:
    try:
        return [FaultKind(kind.strip()) for kind in text.split(",") if kind.strip()]
    except ValueError:
        choices = ", ".join(FaultKind)
        raise argparse.ArgumentTypeError(f"unknown fault kind in {text!r}; choose from {choices}") from None


# How options that are not a plain number are given on the command line.
_OPTION_FORMS: dict[str, dict[str, Any]] = {
    "served_model_name": {"action": "extend", "nargs": "+", "metavar": "NAME"},
    "zero_latency": {"action": "store_true"},
    "fault_kinds": {"action": "extend", "type": _fault_kinds, "metavar": "KIND[,KIND...]"},
    "fail_if_contains": {"action": "append", "metavar": "TEXT"},
    "api_key": {"metavar": "KEY"},
}


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per SimulatorConfig field (`--max-num-seqs` for max_num_seqs); options not given
    keep the config defaults."""
    server = parser.add_argument_group("simulated server and its capacity model (continuous batching)")
    faults = parser.add_argument_group("fault injection (replaceable at runtime: POST /simulator/faults)")
    for name, info in SimulatorConfig.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        (faults if name in FaultConfig.model_fields else server).add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            help=f"{info.description} (default: {shown})",
            **_OPTION_FORMS.get(name, {"type": info.annotation}),
        )


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The SimulatorConfig for options parsed by a parser set up with add_simulator_arguments."""
    given = {name: getattr(args, name) for name in SimulatorConfig.model_fields if hasattr(args, name)}
    return SimulatorConfig(**given)


def _to_argv(config: SimulatorConfig) -> list[str]:
    """Command-line options that reproduce a config (`--name=value`, so values may start with '-')."""
    argv = []
    for name, value in config.model_dump(mode="json", exclude_defaults=True).items():
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv += [option] if value else []
        elif isinstance(value, list):
            argv += [f"{option}={item}" for item in value]
        elif value is not None:
            argv.append(f"{option}={value}")
    return argv


class SimulatorProcess:
    """A simulator running as a child process on 127.0.0.1; `with` stops it on the way out."""

    def __init__(self, config: SimulatorConfig, startup_timeout_s: float = 30.0):
        self.config = config
        self.port = config.port
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[str] | None = None
        self._start()

    @property
    def base_url(self) -> str:
        """Root URL, without /v1 (e.g. http://127.0.0.1:PORT)."""
        return f"http://{HOST}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """The base URL an OpenAI client expects: the root plus /v1."""
        return f"{self.base_url}/v1"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _start(self) -> None:
        config = self.config.model_copy(update={"port": self.port})
        process = subprocess.Popen(
            [sys.executable, "-m", "qa_pipeline.core.simulator", *_to_argv(config)],
            stdout=subprocess.PIPE,
            text=True,
        )
        # A test run that dies without stopping us must not leave a server behind.
        weakref.finalize(self, _kill_quietly, process)
        self._process = process
        line = _read_line(process, self._startup_timeout_s)
        if not line.startswith(LISTENING_PREFIX):
            _kill_quietly(process)
            raise RuntimeError(
                f"the simulator did not start (exit code {process.poll()}, first line {line!r}); "
                "its error is on stderr above"
            )
        self.port = int(line.strip().rsplit(":", 1)[1])

    def stats(self) -> dict[str, Any]:
        """GET /simulator/stats."""
        return self._call("GET", "/simulator/stats")

    def set_faults(self, **fault_options: Any) -> FaultConfig:
        """Replace the whole fault config (options not given take their defaults, api_key included)."""
        faults = FaultConfig(**fault_options)
        self._call("POST", "/simulator/faults", faults.model_dump(mode="json"))
        return faults

    def reset_stats(self) -> None:
        self._call("POST", "/simulator/reset-stats", {})

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as a crashed vLLM would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._close_pipe()

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit within 10 s."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._close_pipe()

    def restart(self) -> None:
        """Stop it if it still runs, then start it again on the same port with its launch options
        (faults set at runtime are gone, as after a real restart)."""
        self.stop()
        self._start()

    def _close_pipe(self) -> None:
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_simulator_process(*, startup_timeout_s: float = 30.0, **options: Any) -> SimulatorProcess:
    """Launch `python -m qa_pipeline.core.simulator` with SimulatorConfig options and wait until it listens."""
    return SimulatorProcess(SimulatorConfig(**options), startup_timeout_s)


def _read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready:
        _kill_quietly(process)
        raise TimeoutError(f"the simulator printed nothing within {timeout_s:.0f} s")
    return process.stdout.readline()


def _kill_quietly(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:
        batch = argparse.ArgumentParser(
            prog="python -m qa_pipeline.core.simulator batch",
            description="Answer a batch input file (JSONL) into a batch output file, as `vllm run-batch` does.",
        )
        batch.add_argument("input_file")
        batch.add_argument("output_file")
        add_simulator_arguments(batch)
        args = batch.parse_args(argv[1:])
        count = run_batch(args.input_file, args.output_file, config_from_args(args))
        print(f"{count} requests answered into {args.output_file}")
        return
    parser = argparse.ArgumentParser(
        prog="python -m qa_pipeline.core.simulator",
        description="Simulated vLLM OpenAI-compatible server with a capacity model and fault injection. "
        "`python -m qa_pipeline.core.simulator batch IN OUT` answers a batch file instead.",
    )
    add_simulator_arguments(parser)
    serve(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
