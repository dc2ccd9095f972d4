"""The async client for OpenAI-compatible servers (vLLM, llama.cpp, Ollama): retries, endpoints, metrics."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import orjson
import uvloop
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field, SecretStr

from qa_pipeline.core.prompts import FailureReason
from qa_pipeline.core.settings import DEFAULT_OUTAGE_TIMEOUT_S, DEFAULT_REQUEST_TIMEOUT_S

_JSON_CONTENT = {"Content-Type": "application/json"}
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ClientConfig(BaseModel):
    """How to reach the server(s) and how patiently to talk to them."""

    base_urls: list[str] = Field(min_length=1, description="OpenAI-style base URLs, ending in /v1")
    # Benchmark results are keyed by it: the embedded server listens on a new port each start, so it is "embedded".
    server_name: str | None = Field(default=None, description="a stable name for the server(s); None: the first base URL")
    model: str | None = Field(default=None, description="served model name; None = the first one served")
    api_key: SecretStr | None = None
    # Where the user sets `model`, for the error that says it is not served.
    model_setting: str = "QA_PIPELINE_LLM_MODEL"
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    connect_timeout_s: float = 10.0
    max_retries: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_connections: int = 512
    # vLLM closes idle keep-alive sockets after 5 s; closing ours first avoids reusing a dead socket.
    keepalive_timeout_s: float = 4.0
    endpoint_cooldown_s: float = Field(
        5.0, description="a failed endpoint is probed after this long; with every endpoint down, retries wait as long"
    )
    probe_interval_max_s: float = Field(30.0, description="probes of a dead endpoint back off up to this interval")
    outage_timeout_s: float = Field(
        DEFAULT_OUTAGE_TIMEOUT_S, gt=0, description="ServerUnavailableError once no endpoint has answered for this long"
    )
    metrics_max_age_s: float = Field(10.0, description="older /metrics figures no longer weigh endpoint choice")

    @classmethod
    def parse_base_urls(cls, text: str) -> list[str]:
        return [normalize_base_url(part) for part in text.split(",") if part.strip()]


def install_event_loop() -> None:
    """Makes the event loops this process creates from now on uvloop's. The client's cost per request is
    mostly the event loop and aiohttp's transports; uvloop's (libuv, in C) cut it by about a tenth
    (benchmarks/README, P4). Dagster creates the loop a run's async assets and resources share, so the
    definitions call this when they are loaded; the simulator runs on uvloop too."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def normalize_base_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all mean the same server."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


class ServerError(Exception):
    """The server cannot be used as configured (unreachable, wrong model, bad key)."""


class CredentialsError(ServerError):
    """The server refused the API key: no other endpoint will do better."""


class ServerUnavailableError(ServerError):
    """No endpoint has answered for `outage_timeout_s`: the server is gone, waiting longer is pointless."""


@dataclass
class Outage:
    """A time when every endpoint is down. Times are `time.monotonic()` readings."""

    began_at: float
    # A probe failed too: the server does not answer at all (not just one dropped connection).
    confirmed: bool = False
    expired: bool = False  # it lasted outage_timeout_s
    ended_at: float | None = None


@dataclass
class ChatOutcome:
    """One chat completion after retries: content on success, a reason on failure."""

    ok: bool
    content: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 0
    endpoint: str = ""
    status: int | None = None
    failure_reason: FailureReason | None = None
    error: str | None = None
    # Set when the last attempt failed because its endpoint went down and no endpoint is up any more.
    outage: Outage | None = None


@dataclass
class ServerMetrics:
    """The load figures a server reports on /metrics (None where it reports nothing)."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    generation_tokens_total: float | None = None
    raw: dict[str, float] = field(default_factory=dict)

    @property
    def has_vllm_metrics(self) -> bool:
        return any(name.startswith("vllm:") for name in self.raw)


_METRIC_ALIASES = {
    "running": ("vllm:num_requests_running", "llamacpp:requests_processing"),
    "waiting": ("vllm:num_requests_waiting", "llamacpp:requests_deferred"),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio"),
    "generation_tokens_total": ("vllm:generation_tokens_total", "llamacpp:tokens_predicted_total"),
}
# Usage ratios are per engine (vLLM with data parallelism reports one series per engine): two engines
# half full are a server half full, not a full one. Every other figure is a count and adds up.
_FULLEST_ENGINE = frozenset(_METRIC_ALIASES["kv_cache_usage"])


def combine_samples(name: str, values: Sequence[float]) -> float:
    """One figure from a metric's series (engines, replicas): the fullest for usage ratios, else the sum."""
    return max(values) if name in _FULLEST_ENGINE else sum(values)


def parse_prometheus(text: str, model: str | None = None) -> ServerMetrics:
    """The figures qa_pipeline steers by, from a Prometheus text page, each combined over its series by
    `combine_samples`. With `model`, a server serving several models is read for that one only: series
    labelled with another `model_name` are left out. vLLM labels every series with its first served
    name, so when no series names `model` (it is served under an alias) all are read.
    Raises ValueError for a page that is not Prometheus text."""
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not math.isnan(sample.value)
    ]
    if model is not None and any(sample.labels.get("model_name") == model for sample in samples):
        samples = [sample for sample in samples if sample.labels.get("model_name", model) == model]
    series: dict[str, list[float]] = {}
    for sample in samples:
        series.setdefault(sample.name, []).append(float(sample.value))
    combined = {name: combine_samples(name, values) for name, values in series.items()}
    picked = {
        field_name: next((combined[a] for a in aliases if a in combined), None)
        for field_name, aliases in _METRIC_ALIASES.items()
    }
    return ServerMetrics(**picked, raw=combined)


class EndpointLimit(Protocol):
    """A per-endpoint concurrency limit (core.concurrency.FixedLimit or AdaptiveLimit fit)."""

    @property
    def limit(self) -> int: ...

    def observe_response(self, latency_s: float, ok: bool, output_tokens: int = 0) -> None: ...

    def observe_metrics(self, metrics: ServerMetrics | None, elapsed_s: float) -> None: ...


@dataclass
class Endpoint:
    """One server replica with its live load, health and (optionally) its own concurrency limit."""

    base_url: str
    outstanding: int = 0
    healthy: bool = True
    probe_at: float = 0.0  # while down: when it is probed next
    requests: int = 0
    failures: int = 0
    limit: EndpointLimit | None = None
    metrics: ServerMetrics | None = None
    metrics_at: float = 0.0
    outstanding_at_metrics: int = 0
    taken_out: int = 0
    put_back: int = 0
    last_error: str | None = None
    cause: str | None = None  # why it is down, short: "connection refused", "HTTP 503"
    last_pick: int = 0

    @property
    def has_room(self) -> bool:
        return self.limit is None or self.outstanding < self.limit.limit

    def load(self, now: float, metrics_max_age_s: float) -> float:
        """How busy the endpoint is: our requests in flight plus, from its recent /metrics, the
        requests of other clients (other runs sharing the server), queued ones counted twice since a
        queue means the server is already full; relative to its own limit when it has one."""
        load = float(self.outstanding)
        if self.metrics is not None and now - self.metrics_at <= metrics_max_age_s:
            running = self.metrics.running or 0.0
            waiting = self.metrics.waiting or 0.0
            load += max(0.0, running + waiting - self.outstanding_at_metrics) + waiting
        return load / max(1, self.limit.limit) if self.limit is not None else load


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Full-jitter exponential backoff; a server's Retry-After wins when it asks for longer."""
    delay = random.uniform(0, min(cap, base * 2**attempt))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def connection_cause(error: BaseException) -> str:
    """What went wrong with a connection, in a few words ("connection refused")."""
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return "host not found"
    if isinstance(error, aiohttp.ClientConnectorError):
        if isinstance(error.os_error, ConnectionRefusedError):
            return "connection refused"
        return f"cannot connect: {error.os_error.strerror or error.os_error}"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(error, asyncio.TimeoutError):
        return "no answer in time"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]  # "connection reset by peer"
    return f"{type(error).__name__}: {error!s}"


def _retry_after_seconds(headers: aiohttp.typedefs.LooseHeaders) -> float | None:
    value = headers.get("Retry-After") if headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class LLMClient:
    """One aiohttp session per run, shared by every request; use as `async with LLMClient(cfg)`."""

    def __init__(
        self,
        config: ClientConfig,
        endpoint_limit: Callable[[str], EndpointLimit] | None = None,
        log: Callable[[str], None] = print,
    ):
        """`endpoint_limit(base_url)` gives each endpoint its own concurrency limit (None: no per-endpoint cap);
        `log` takes the lines that say when the servers stop and start answering."""
        self.config = config
        self.endpoints = [
            Endpoint(url, limit=endpoint_limit(url) if endpoint_limit else None) for url in config.base_urls
        ]
        self.model: str | None = config.model
        self.server_name: str = config.server_name or self.endpoints[0].base_url
        self.max_model_len: int | None = None  # the model's context, as /v1/models reports it (vLLM does)
        self.log = log
        self._outage: Outage | None = None
        self._outage_watch: asyncio.Task | None = None
        self.structured_output = True
        self._session: aiohttp.ClientSession | None = None
        self._started = time.monotonic()
        self._changed = asyncio.Event()
        self._probes: dict[str, asyncio.Task] = {}
        self._picks = 0
        self._encoded_format: tuple[dict, bytes] | None = None

    async def __aenter__(self) -> LLMClient:
        # The session must be created inside the running loop (aiohttp binds it to the loop).
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            limit_per_host=0,
            keepalive_timeout=self.config.keepalive_timeout_s,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=self.config.request_timeout_s, sock_connect=self.config.connect_timeout_s
            ),
            headers=self._headers(),
        )
        return self

    async def __aexit__(self, *exc_info) -> None:
        probes = list(self._probes.values())
        if self._outage_watch is not None:
            probes.append(self._outage_watch)
            self._outage_watch = None
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        self._probes.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @contextmanager
    def log_to(self, log: Callable[[str], None]) -> Iterator[None]:
        """Sends the outage lines to `log` (a run's log) while inside."""
        previous, self.log = self.log, log
        try:
            yield
        finally:
            self.log = previous

    def _headers(self) -> dict[str, str]:
        if self.config.api_key is None:
            return {}
        return {"Authorization": f"Bearer {self.config.api_key.get_secret_value()}"}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("LLMClient must be used inside `async with`")
        return self._session

    # -- endpoints -------------------------------------------------------------------------

    def _pick_endpoint(self, retrying: bool = False) -> Endpoint | None:
        """The least loaded healthy endpoint with room under its limit; None means wait.

        When every endpoint is down, a retry is sent anyway (to the endpoint probed next), so a request
        fails within its retry bounds with a recorded reason; a first attempt waits for one to come back.
        """
        now = time.monotonic()
        healthy = [e for e in self.endpoints if e.healthy]
        if healthy:
            with_room = [e for e in healthy if e.has_room]
            if not with_room:
                return None
            # Equal loads (an idle fleet) take turns, so a restarted endpoint is not flooded to catch up.
            chosen = min(with_room, key=lambda e: (e.load(now, self.config.metrics_max_age_s), e.last_pick))
        elif retrying:
            chosen = min(self.endpoints, key=lambda e: e.probe_at)
        else:
            return None
        self._picks += 1
        chosen.last_pick = self._picks
        return chosen

    async def _wait_for_endpoint(self, retrying: bool) -> Endpoint:
        """The endpoint for the next attempt; raises ServerUnavailableError once an outage has lasted too long."""
        while True:
            if self._outage is not None and self._outage.expired:
                raise self._unavailable()
            endpoint = self._pick_endpoint(retrying)
            if endpoint is not None:
                return endpoint
            # A slot frees, a limit grows or an endpoint comes back: woken at once by _notify.
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), 1.0)
            except TimeoutError:
                pass

    async def _pause(self, delay: float) -> None:
        """The wait before a retry; during an outage it ends early when an endpoint is back or the outage expires."""
        outage = self._outage
        if outage is None:
            await asyncio.sleep(delay)
            return
        deadline = time.monotonic() + delay
        while outage.ended_at is None and not outage.expired and (left := deadline - time.monotonic()) > 0:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                pass

    async def wait_out(self, outage: Outage) -> bool:
        """Waits until `outage` ends; whether it was a real one (the server did not answer a probe either)
        rather than a connection dropped by a server that is up. Raises ServerUnavailableError when no
        endpoint answers within `outage_timeout_s`."""
        while outage.ended_at is None:
            if outage.expired:
                raise self._unavailable()
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), 1.0)
            except TimeoutError:
                pass
        return outage.confirmed

    def _notify(self) -> None:
        """Wakes requests waiting for an endpoint (a request ended, an endpoint came back)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _mark_down(self, endpoint: Endpoint, cause: str, probe_now: bool = False) -> None:
        """Takes the endpoint out; a background probe (GET /v1/models) puts it back once it answers.

        `probe_now` probes at once rather than after the cooldown: a refused connection costs nothing to
        check, and a server that is gone is then known (and said) at once.
        """
        if endpoint.healthy:
            endpoint.healthy = False
            endpoint.taken_out += 1
        endpoint.cause = endpoint.last_error = cause
        if self._outage is None and not any(e.healthy for e in self.endpoints):
            self._outage = Outage(began_at=time.monotonic())
        probe = self._probes.get(endpoint.base_url)
        if (probe is None or probe.done()) and self._session is not None:
            first = 0.0 if probe_now else self.config.endpoint_cooldown_s
            self._probes[endpoint.base_url] = asyncio.get_running_loop().create_task(self._probe(endpoint, first))

    async def _probe(self, endpoint: Endpoint, first_delay_s: float) -> None:
        # The probe keeps its own schedule: requests never wait for it, so it cannot move their retry time.
        interval = self.config.endpoint_cooldown_s
        endpoint.probe_at = time.monotonic() + first_delay_s
        while not endpoint.healthy:
            await asyncio.sleep(max(0.0, endpoint.probe_at - time.monotonic()))
            if endpoint.healthy:  # a request that was already on its way succeeded
                break
            if await self._answers(endpoint):
                self._put_back(endpoint)
                break
            self._confirm_outage()
            endpoint.probe_at = time.monotonic() + interval
            interval = min(max(interval, 0.05) * 2, self.config.probe_interval_max_s)

    def _confirm_outage(self) -> None:
        """A probe failed while every endpoint is down: the outage is real. Said once, when it starts."""
        outage = self._outage
        if outage is None or outage.confirmed or any(e.healthy for e in self.endpoints):
            return
        outage.confirmed = True
        self.log(
            f"LLM server unreachable: {self._causes()}. Requests in flight are retried (up to "
            f"{self.config.max_retries} times), new ones wait; giving up if no endpoint answers within "
            f"{self.config.outage_timeout_s:g} s."
        )
        self._outage_watch = asyncio.get_running_loop().create_task(self._watch_outage(outage))

    async def _watch_outage(self, outage: Outage) -> None:
        """Expires the outage once it has lasted `outage_timeout_s`, unless a last probe finds an endpoint back."""
        await asyncio.sleep(max(0.0, outage.began_at + self.config.outage_timeout_s - time.monotonic()))
        if outage.ended_at is not None:
            return
        down = [e for e in self.endpoints if not e.healthy]
        for endpoint, answers in zip(down, await asyncio.gather(*(self._answers(e) for e in down))):
            if answers and not endpoint.healthy:
                self._put_back(endpoint)
        if outage.ended_at is None:
            outage.expired = True
            self._notify()

    def _causes(self) -> str:
        return "; ".join(f"{e.base_url}: {e.cause or 'no answer'}" for e in self.endpoints if not e.healthy)

    def _unavailable(self) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"no endpoint answered for {self.config.outage_timeout_s:g} s: {self._causes()}"
        )

    async def _answers(self, endpoint: Endpoint) -> bool:
        try:
            async with self.session.get(
                f"{endpoint.base_url}/models", timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                if response.status != 200:
                    endpoint.cause = f"HTTP {response.status} from /models"
                    endpoint.last_error = f"probe of {endpoint.base_url}/models: HTTP {response.status}"
                    return False
                await response.read()
                return True
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as error:
            endpoint.cause = connection_cause(error)
            endpoint.last_error = f"probe of {endpoint.base_url}/models: {type(error).__name__}: {error!s}"
            return False

    def _put_back(self, endpoint: Endpoint) -> None:
        endpoint.healthy = True
        endpoint.put_back += 1
        endpoint.probe_at = 0.0
        endpoint.metrics = None  # figures from before it died say nothing about the restarted server
        outage, self._outage = self._outage, None
        if outage is not None:
            outage.ended_at = time.monotonic()
            if self._outage_watch is not None:
                self._outage_watch.cancel()
                self._outage_watch = None
            if outage.confirmed:
                self.log(
                    f"LLM server answers again: {endpoint.base_url}, after {outage.ended_at - outage.began_at:.0f} s"
                )
        self._notify()

    async def _send(self, endpoint: Endpoint, body: dict) -> tuple[ChatOutcome, float | None]:
        """One attempt on a chosen endpoint, reported to its limit; wakes requests waiting for room."""
        started = time.perf_counter()
        try:
            outcome, retry_after = await self._attempt(endpoint, body)
        finally:
            self._notify()
        if endpoint.limit is not None:
            endpoint.limit.observe_response(time.perf_counter() - started, outcome.ok, outcome.completion_tokens)
        if not outcome.ok and outcome.error:
            endpoint.last_error = outcome.error
        if outcome.status is not None and outcome.status not in (502, 503) and not endpoint.healthy:
            self._put_back(endpoint)  # it answers: back before its probe noticed
        return outcome, retry_after

    # -- server information --------------------------------------------------------------

    async def list_models(self, base_url: str | None = None) -> list[str]:
        return list(await self._served_models(base_url))

    async def _served_models(self, base_url: str | None = None) -> dict[str, dict]:
        """The /v1/models entries by model id."""
        url = f"{base_url or self.endpoints[0].base_url}/models"
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                if response.status in (401, 403):
                    raise CredentialsError(
                        f"{url} refused the API key (HTTP {response.status}); "
                        "set QA_PIPELINE_LLM_API_KEY to a key the server accepts"
                    )
                response.raise_for_status()
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise ServerError(f"cannot reach the LLM server at {url}: {error!s}") from None
        return {item["id"]: item for item in body.get("data", []) if isinstance(item, dict) and "id" in item}

    async def resolve_model(self) -> str:
        """The model to use; fails early, naming what is served, when the configured one is not.

        Every endpoint is asked; one that cannot be reached is taken out (and probed until it
        answers) as long as another one answers, so a run can start while a replica restarts.
        """
        answers = await asyncio.gather(
            *(self._served_models(e.base_url) for e in self.endpoints), return_exceptions=True
        )
        reachable = [(e, served) for e, served in zip(self.endpoints, answers) if isinstance(served, dict)]
        for answer in answers:
            if isinstance(answer, BaseException) and (isinstance(answer, CredentialsError) or not reachable):
                raise answer
        for endpoint, answer in zip(self.endpoints, answers):
            if isinstance(answer, ServerError):
                self._mark_down(endpoint, str(answer))
            elif isinstance(answer, BaseException):
                raise answer
        first, served = reachable[0]
        if not served:
            raise ServerError(f"{first.base_url} serves no model")
        if self.model is None:
            self.model = next(iter(served))
        for endpoint, served in reachable:
            if self.model not in served:
                raise ServerError(
                    f"model {self.model!r} is not served by {endpoint.base_url}; "
                    f"it serves: {', '.join(served) or 'nothing'}. Set {self.config.model_setting} to a model "
                    "every one of its endpoints serves."
                )
        lengths = [entries[self.model].get("max_model_len") for _, entries in reachable]
        lengths = [length for length in lengths if isinstance(length, int) and length > 0]
        self.max_model_len = min(lengths) if lengths else None
        return self.model

    async def metrics(self, base_url: str | None = None) -> ServerMetrics | None:
        """The servers' Prometheus metrics, or None when none offers any (Ollama, llama.cpp without --metrics).

        Without `base_url`: every healthy endpoint is read (see `endpoint_metrics`) and the figures
        are combined, requests and tokens summed, KV cache usage the fullest endpoint's.
        """
        if base_url is not None:
            return await self._read_metrics(base_url)
        read = [m for m in (await self.endpoint_metrics()).values() if m is not None]
        if not read:
            return None
        return _combine_metrics(read)

    async def endpoint_metrics(self) -> dict[str, ServerMetrics | None]:
        """Each healthy endpoint's metrics, by base URL; also kept on the endpoint (they weigh the
        choice of endpoint) and passed to its own limit. Down endpoints are not read."""
        live = [e for e in self.endpoints if e.healthy]
        outstanding = [e.outstanding for e in live]
        read = await asyncio.gather(*(self._read_metrics(e.base_url) for e in live))
        now = time.monotonic()
        for endpoint, before, metrics in zip(live, outstanding, read):
            if metrics is not None:
                endpoint.metrics, endpoint.metrics_at, endpoint.outstanding_at_metrics = metrics, now, before
            if endpoint.limit is not None:
                endpoint.limit.observe_metrics(metrics, now - self._started)
        if live:
            self._notify()  # a limit may have grown
        return {e.base_url: m for e, m in zip(live, read)}

    async def _read_metrics(self, base_url: str) -> ServerMetrics | None:
        root = base_url.removesuffix("/v1")
        try:
            async with self.session.get(f"{root}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response:
                if response.status != 200:
                    return None
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None
        try:
            return parse_prometheus(text, self.model)
        except ValueError:
            return None  # not a metrics page (a proxy's HTML, say): as if the server had none

    # -- chat ------------------------------------------------------------------------------

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        response_format: dict | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> ChatOutcome:
        """One chat completion with bounded, jittered retries; fails with a recorded reason, and raises only
        ServerUnavailableError, once no endpoint has answered for `outage_timeout_s`."""
        body = chat_request_body(
            self.model,
            messages,
            response_format=response_format if self.structured_output else None,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
        )
        started = time.perf_counter()
        outcome = ChatOutcome(ok=False)
        for attempt in range(self.config.max_retries + 1):
            if not self.structured_output:  # the server rejected response_format (see _should_retry)
                body.pop("response_format", None)
            endpoint = await self._wait_for_endpoint(retrying=attempt > 0)
            outcome, retry_after = await self._send(endpoint, body)
            outcome.attempts = attempt + 1
            if outcome.ok or not self._should_retry(outcome, body):
                break
            if attempt < self.config.max_retries:
                delay = backoff_delay(attempt, self.config.backoff_base_s, self.config.backoff_max_s, retry_after)
                if self._outage is not None:
                    # Every endpoint is down: a restarting server needs longer than a backoff step.
                    delay = max(delay, self.config.endpoint_cooldown_s)
                await self._pause(delay)
        if not outcome.ok and self._outage is not None and (
            outcome.failure_reason is FailureReason.CONNECTION_ERROR or outcome.status in (502, 503)
        ):
            outcome.outage = self._outage
        outcome.latency_s = time.perf_counter() - started
        return outcome

    def _should_retry(self, outcome: ChatOutcome, body: dict) -> bool:
        if outcome.status == 400 and "response_format" in body and _mentions_response_format(outcome.error):
            # Servers without structured output (older Ollama, some proxies) reject the field:
            # fall back to plain prompting, the parser repairs fenced or chatty JSON.
            self.structured_output = False
            return True
        return outcome.status is None or outcome.status in RETRYABLE_STATUS

    async def _attempt(self, endpoint: Endpoint, body: dict) -> tuple[ChatOutcome, float | None]:
        url = f"{endpoint.base_url}/chat/completions"
        endpoint.outstanding += 1
        endpoint.requests += 1
        try:
            async with self.session.post(url, data=self._encode(body), headers=_JSON_CONTENT) as response:
                if response.status != 200:
                    text = (await response.text())[:500]
                    return self._http_failure(endpoint, response.status, text), _retry_after_seconds(
                        response.headers
                    )
                payload = orjson.loads(await response.read())
        except asyncio.TimeoutError:
            endpoint.failures += 1
            return ChatOutcome(
                ok=False,
                endpoint=endpoint.base_url,
                failure_reason=FailureReason.TIMEOUT,
                error=f"no answer from {url} within {self.config.request_timeout_s:g} s",
            ), None
        except (aiohttp.ClientError, ConnectionError) as error:
            endpoint.failures += 1
            cause = connection_cause(error)
            self._mark_down(endpoint, cause, probe_now=True)
            return ChatOutcome(
                ok=False,
                endpoint=endpoint.base_url,
                failure_reason=FailureReason.CONNECTION_ERROR,
                error=f"{url}: {cause}",
            ), None
        except ValueError as error:
            return ChatOutcome(
                ok=False,
                status=200,
                endpoint=endpoint.base_url,
                failure_reason=FailureReason.INVALID_JSON,
                error=f"{url} answered with a body that is not JSON: {error!s}",
            ), None
        finally:
            endpoint.outstanding -= 1
        return outcome_from_payload(payload, endpoint.base_url), None

    def _encode(self, body: dict) -> bytes:
        """The request as JSON. The response_format schema is most of it and the same object on every
        request of a run, so it is serialized once."""
        response_format = body.get("response_format")
        if response_format is None:
            return orjson.dumps(body)
        if self._encoded_format is None or self._encoded_format[0] is not response_format:
            self._encoded_format = (response_format, orjson.dumps(response_format))
        rest = orjson.dumps({key: value for key, value in body.items() if key != "response_format"})
        return b"".join((rest[:-1], b',"response_format":', self._encoded_format[1], b"}"))

    def _http_failure(self, endpoint: Endpoint, status: int, text: str) -> ChatOutcome:
        endpoint.failures += 1
        reason = FailureReason.HTTP_ERROR
        if status == 429:
            reason = FailureReason.RATE_LIMITED
        elif status == 404 and "model" in text.lower():
            reason = FailureReason.MODEL_NOT_FOUND
        elif status in (502, 503):
            # A replica that is restarting or overloaded: let the others take the load for a while.
            self._mark_down(endpoint, f"HTTP {status}")
        return ChatOutcome(
            ok=False,
            status=status,
            endpoint=endpoint.base_url,
            failure_reason=reason,
            error=f"HTTP {status} from {endpoint.base_url}/chat/completions: {text}",
        )


def chat_request_body(
    model: str | None,
    messages: Sequence[dict[str, str]],
    *,
    response_format: dict | None = None,
    max_tokens: int = 512,
    temperature: float = 0.0,
    seed: int | None = None,
) -> dict:
    """The body of one chat-completions request: what LLMClient.chat sends, and what a batch export writes."""
    body: dict = {"model": model, "messages": list(messages), "max_tokens": max_tokens, "temperature": temperature}
    if seed is not None:
        body["seed"] = seed
    if response_format is not None:
        body["response_format"] = response_format
    return body


def _combine_metrics(read: list[ServerMetrics]) -> ServerMetrics:
    """Several replicas' figures as one, as `combine_samples` combines a server's engines."""

    def combined(name: str) -> float | None:
        values = [v for m in read if (v := getattr(m, name)) is not None]
        return combine_samples(_METRIC_ALIASES[name][0], values) if values else None

    raw: dict[str, list[float]] = {}
    for metrics in read:
        for name, value in metrics.raw.items():
            raw.setdefault(name, []).append(value)
    return ServerMetrics(
        **{name: combined(name) for name in _METRIC_ALIASES},
        raw={name: combine_samples(name, values) for name, values in raw.items()},
    )


def _mentions_response_format(error: str | None) -> bool:
    text = (error or "").lower()
    return "response_format" in text or "json_schema" in text


def outcome_from_payload(payload: dict, endpoint: str) -> ChatOutcome:
    try:
        choice = payload["choices"][0]
        content = choice["message"].get("content")
        finish_reason = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ChatOutcome(
            ok=False,
            status=200,
            endpoint=endpoint,
            failure_reason=FailureReason.INVALID_JSON,
            error=f"{endpoint} answered without choices[0].message: {str(payload)[:300]}",
        )
    usage = payload.get("usage") or {}
    return ChatOutcome(
        ok=True,
        status=200,
        content=content,
        finish_reason=finish_reason,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        endpoint=endpoint,
    )
