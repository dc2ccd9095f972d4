"""The simulator's HTTP server: the OpenAI-compatible API, vLLM's metrics, stats and runtime fault control."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop
from aiohttp import web

from qa_pipeline.core.prompts import PASSAGE_OPEN, extract_passage, extract_passages
from qa_pipeline.simulator.config import HOST, FaultConfig, FaultKind, SimulatorConfig
from qa_pipeline.simulator.content import (
    QA_SCHEMA_KEY,
    SchemaError,
    drop_a_field,
    render,
)
from qa_pipeline.simulator.engine import Engine

logger = logging.getLogger(__name__)

LISTENING_PREFIX = "simulator listening on "


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


@dataclass
class _ProfiledModel:
    """A served model with a profile of its own: its options, its engine, its fault draws."""

    config: SimulatorConfig
    engine: Engine
    fault_random: random.Random


class Simulator:
    """The request handlers and the state they share."""

    def __init__(self, config: SimulatorConfig):
        self.config = config
        self.engine = Engine(config)
        self.models = set(config.served_model_name)
        self.profiled = {
            name: _ProfiledModel(config.for_model(name), Engine(config.for_model(name)), random.Random(config.fault_seed))
            for name in config.model_profiles
        }
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
        engines = [self.engine, *(model.engine for model in self.profiled.values())]
        tasks = [asyncio.create_task(engine.run()) for engine in engines]
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
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
            body = orjson.loads(await request.read())
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
        # A multi-hop prompt holds several passages: each evidence slot quotes its own.
        hops = tuple(extract_passages(prompt))
        hops = hops if len(hops) > 1 else ()
        if hops:
            passage = "\n\n".join(hops)
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
        profiled = self.profiled.get(model)
        fault = self._draw_fault(profiled)
        if fault is not None:
            self.stats.faults[fault] += 1
            if (response := await self._http_fault(request, fault)) is not None:
                return response

        served = profiled.config if profiled else self.config
        if _draw(prompt, "ungrounded") < served.ungrounded_rate:
            passage, hops = _UNGROUNDED_PASSAGE, ()
        content, fenced = self._content(body.get("response_format"), passage, hops)
        drawn = self._output_tokens(prompt, served)
        output_tokens = drawn
        if fault is FaultKind.TRUNCATE:
            drawn = max(drawn, 2)  # so that half of it is still a cut
            output_tokens = drawn // 2
        elif max_tokens is not None:
            output_tokens = min(drawn, max_tokens)
        await (profiled.engine if profiled else self.engine).generate(prompt_tokens, output_tokens)

        if fault is FaultKind.MALFORMED:
            content = "Sure! " + content.replace('"', "'")
        elif fault is FaultKind.MISSING_FIELD:
            content = json.dumps(drop_a_field(json.loads(content)), ensure_ascii=False)
        if fenced:
            content = f"Here are the question/answer pairs for the passage.\n\n```json\n{content}\n```"
        finish_reason = "stop"
        if output_tokens < drawn:
            # Cut where a real server would stop: mid-JSON, in proportion to the tokens emitted.
            content = content[: len(content) * output_tokens // drawn]
            finish_reason = "length"
        return self._completion(model, content, finish_reason, prompt_tokens, output_tokens)

    def _draw_fault(self, profiled: _ProfiledModel | None = None) -> FaultKind | None:
        faults, draws = (profiled.config, profiled.fault_random) if profiled else (self.faults, self.fault_random)
        if faults.fault_rate and draws.random() < faults.fault_rate:
            return draws.choice(faults.fault_kinds)
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

    def _content(self, response_format: Any, passage: str, hops: tuple[str, ...] = ()) -> tuple[str, bool]:
        """The JSON answer, and whether to wrap it in prose and a code fence (no response_format asked)."""
        evidence = self.config.evidence()
        if response_format is None or response_format == {"type": "text"}:
            return render(QA_SCHEMA_KEY, passage, evidence), True
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            return render(QA_SCHEMA_KEY, passage, evidence), False
        if kind != "json_schema":
            raise _BadRequest(400, "BadRequestError", f"unsupported response_format: {response_format!r}")
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise _BadRequest(400, "BadRequestError", "response_format.json_schema.schema must be a JSON object")
        try:
            return render(self._schema_key(schema), passage, evidence, hops), False
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

    def _output_tokens(self, prompt: str, config: SimulatorConfig) -> int:
        """A lognormal draw seeded by the prompt, so the same request always has the same length."""
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
        return web.Response(body=orjson.dumps(body), content_type="application/json", charset="utf-8")

    async def metrics(self, request: web.Request) -> web.Response:
        label = self.model_label
        # A profiled model's engine is read under its own model_name, as a second vLLM server would be.
        engines = [(label, self.engine, self.config)] + [
            (f'model_name="{_label_value(name)}"', model.engine, model.config) for name, model in self.profiled.items()
        ]
        samples = [
            ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
             [(labels, len(engine.running)) for labels, engine, _ in engines]),
            ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
             [(labels, len(engine.waiting)) for labels, engine, _ in engines]),
            ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
             [(labels, engine.kv_cache_usage()) for labels, engine, _ in engines]),
            ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
             [(labels, engine.prompt_tokens_total) for labels, engine, _ in engines]),
            ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
             [(labels, engine.generation_tokens_total) for labels, engine, _ in engines]),
            ("vllm:request_success_total", "counter", "Count of successfully processed requests.",
             [(f'finished_reason="{reason}",{label}', count) for reason, count in self.success.items()]),
            ("simulator:ceiling_output_tokens_per_s", "gauge", "Output tokens per second with every slot busy.",
             [(labels, _ceiling(config)) for labels, _, config in engines]),
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


# What an ungrounded answer is made of: text that no documentation passage contains.
_UNGROUNDED_PASSAGE = (
    "Zebras migrate across the Serengeti plains every spring. Ancient mariners navigated by the stars "
    "above Polynesia. Saffron remains the costliest spice harvested by hand in Kashmir."
)


def _draw(prompt: str, purpose: str) -> float:
    """A number in [0, 1) seeded by the prompt, so the same request always draws the same."""
    digest = hashlib.blake2b(f"{purpose}\n{prompt}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _ceiling(config: SimulatorConfig) -> float:
    ceiling = config.ceiling_output_tokens_per_s
    return math.inf if ceiling is None else ceiling


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_value(value: float) -> str:
    return "+Inf" if value == math.inf else repr(float(value))


def serve(config: SimulatorConfig) -> None:
    """Run the simulator on 127.0.0.1 until SIGINT or SIGTERM; prints the listening line once it accepts connections."""
    # An entry point: its start-up log (with the ceiling) must show unless the caller set logging up already.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # On uvloop, as the project's runs: less CPU per request, so a zero-latency benchmark measures the client (P4).
    uvloop.run(_serve(config))


async def _serve(config: SimulatorConfig) -> None:
    simulator = Simulator(config)
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

