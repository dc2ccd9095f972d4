"""The async client for OpenAI-compatible servers (vLLM, llama.cpp, Ollama): retries, endpoints, metrics."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from pydantic import BaseModel, Field, SecretStr

from qa_pipeline.core.prompts import FailureReason

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ClientConfig(BaseModel):
    """How to reach the server(s) and how patiently to talk to them."""

    base_urls: list[str] = Field(min_length=1, description="OpenAI-style base URLs, ending in /v1")
    model: str | None = Field(default=None, description="served model name; None = the first one served")
    api_key: SecretStr | None = None
    request_timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    max_retries: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_connections: int = 512
    # vLLM closes idle keep-alive sockets after 5 s; closing ours first avoids reusing a dead socket.
    keepalive_timeout_s: float = 4.0
    endpoint_cooldown_s: float = 5.0

    @classmethod
    def parse_base_urls(cls, text: str) -> list[str]:
        return [normalize_base_url(part) for part in text.split(",") if part.strip()]


def normalize_base_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all mean the same server."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


class ServerError(Exception):
    """The server cannot be used as configured (unreachable, wrong model, bad key)."""


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
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "llamacpp:kv_cache_usage_ratio"),
    "generation_tokens_total": ("vllm:generation_tokens_total", "llamacpp:tokens_predicted_total"),
}


def parse_prometheus(text: str) -> ServerMetrics:
    """Sum each metric over its labels; keep the figures qa_pipeline steers by."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    picked = {
        field_name: next((totals[a] for a in aliases if a in totals), None)
        for field_name, aliases in _METRIC_ALIASES.items()
    }
    return ServerMetrics(**picked, raw=totals)


@dataclass
class Endpoint:
    """One server replica with its live load and health."""

    base_url: str
    outstanding: int = 0
    healthy: bool = True
    down_until: float = 0.0
    requests: int = 0
    failures: int = 0


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Full-jitter exponential backoff; a server's Retry-After wins when it asks for longer."""
    delay = random.uniform(0, min(cap, base * 2**attempt))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def _retry_after_seconds(headers: aiohttp.typedefs.LooseHeaders) -> float | None:
    value = headers.get("Retry-After") if headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class LLMClient:
    """One aiohttp session per run, shared by every request; use as `async with LLMClient(cfg)`."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.endpoints = [Endpoint(url) for url in config.base_urls]
        self.model: str | None = config.model
        self.structured_output = True
        self._session: aiohttp.ClientSession | None = None

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
        if self._session is not None:
            await self._session.close()
            self._session = None

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

    def _pick_endpoint(self) -> Endpoint | None:
        now = time.monotonic()
        usable = [e for e in self.endpoints if e.healthy or e.down_until <= now]
        if not usable:
            return None
        return min(usable, key=lambda e: (not e.healthy, e.outstanding, e.requests))

    def _mark_down(self, endpoint: Endpoint) -> None:
        endpoint.healthy = False
        endpoint.down_until = time.monotonic() + self.config.endpoint_cooldown_s

    async def _wait_for_endpoint(self) -> Endpoint:
        while (endpoint := self._pick_endpoint()) is None:
            await asyncio.sleep(min(e.down_until for e in self.endpoints) - time.monotonic() + 0.01)
        return endpoint

    # -- server information --------------------------------------------------------------

    async def list_models(self, base_url: str | None = None) -> list[str]:
        url = f"{base_url or self.endpoints[0].base_url}/models"
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                if response.status in (401, 403):
                    raise ServerError(
                        f"{url} refused the API key (HTTP {response.status}); "
                        "set QA_PIPELINE_LLM_API_KEY to a key the server accepts"
                    )
                response.raise_for_status()
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise ServerError(f"cannot reach the LLM server at {url}: {error!s}") from None
        return [item["id"] for item in body.get("data", []) if "id" in item]

    async def resolve_model(self) -> str:
        """The model to use; fails early, naming what is served, when the configured one is not."""
        served = await self.list_models()
        if not served:
            raise ServerError(f"{self.endpoints[0].base_url} serves no model")
        if self.model is None:
            self.model = served[0]
        elif self.model not in served:
            raise ServerError(
                f"model {self.model!r} is not served by {self.endpoints[0].base_url}; "
                f"it serves: {', '.join(served)}. Set QA_PIPELINE_LLM_MODEL to one of them."
            )
        return self.model

    async def metrics(self, base_url: str | None = None) -> ServerMetrics | None:
        """The server's Prometheus metrics, or None when it offers none (Ollama, llama.cpp without --metrics)."""
        root = (base_url or self.endpoints[0].base_url).removesuffix("/v1")
        try:
            async with self.session.get(f"{root}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response:
                if response.status != 200:
                    return None
                return parse_prometheus(await response.text())
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

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
        """One chat completion with bounded, jittered retries; never raises for server trouble."""
        body: dict = {
            "model": self.model,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if seed is not None:
            body["seed"] = seed
        started = time.perf_counter()
        outcome = ChatOutcome(ok=False)
        for attempt in range(self.config.max_retries + 1):
            if response_format is not None and self.structured_output:
                body["response_format"] = response_format
            else:
                body.pop("response_format", None)
            endpoint = await self._wait_for_endpoint()
            outcome, retry_after = await self._attempt(endpoint, body)
            outcome.attempts = attempt + 1
            if outcome.ok or not self._should_retry(outcome, body):
                break
            if attempt < self.config.max_retries:
                await asyncio.sleep(
                    backoff_delay(attempt, self.config.backoff_base_s, self.config.backoff_max_s, retry_after)
                )
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
            async with self.session.post(url, json=body) as response:
                if response.status != 200:
                    text = (await response.text())[:500]
                    return self._http_failure(endpoint, response.status, text), _retry_after_seconds(
                        response.headers
                    )
                payload = await response.json(content_type=None)
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
            self._mark_down(endpoint)
            return ChatOutcome(
                ok=False,
                endpoint=endpoint.base_url,
                failure_reason=FailureReason.CONNECTION_ERROR,
                error=f"{url}: {type(error).__name__}: {error!s}",
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
        endpoint.healthy = True
        return _outcome_from_payload(payload, endpoint.base_url), None

    def _http_failure(self, endpoint: Endpoint, status: int, text: str) -> ChatOutcome:
        endpoint.failures += 1
        reason = FailureReason.HTTP_ERROR
        if status == 429:
            reason = FailureReason.RATE_LIMITED
        elif status == 404 and "model" in text.lower():
            reason = FailureReason.MODEL_NOT_FOUND
        elif status in (502, 503):
            # A replica that is restarting or overloaded: let the others take the load for a while.
            self._mark_down(endpoint)
        return ChatOutcome(
            ok=False,
            status=status,
            endpoint=endpoint.base_url,
            failure_reason=reason,
            error=f"HTTP {status} from {endpoint.base_url}/chat/completions: {text}",
        )


def _mentions_response_format(error: str | None) -> bool:
    text = (error or "").lower()
    return "response_format" in text or "json_schema" in text


def _outcome_from_payload(payload: dict, endpoint: str) -> ChatOutcome:
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
