"""How many requests may be in flight: a fixed limit, an adaptive one, and the gate the dispatch loop passes through."""

from __future__ import annotations

import asyncio
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from qa_pipeline.core.client import ServerMetrics


class ConcurrencyLimit(Protocol):
    """What the generator needs from a limit: the current value, its ceiling, and two feedback hooks."""

    max_limit: int

    @property
    def limit(self) -> int: ...

    def observe_response(self, latency_s: float, ok: bool, output_tokens: int = 0) -> None: ...

    def observe_metrics(self, metrics: ServerMetrics | None, elapsed_s: float) -> None: ...


class FixedLimit:
    """A constant concurrency limit (a configured value or the benchmark's recommendation)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"concurrency must be at least 1, got {limit}")
        self.limit = limit
        self.max_limit = limit

    def observe_response(self, latency_s: float, ok: bool, output_tokens: int = 0) -> None:
        """A fixed limit ignores feedback; adaptive limits override this."""

    def observe_metrics(self, metrics: ServerMetrics | None, elapsed_s: float) -> None:
        """A fixed limit ignores feedback; adaptive limits override this."""

    def describe(self) -> str:
        return f"{self.limit}"


@dataclass(frozen=True)
class LimitChange:
    """One decision of the adaptive limit that changed it, and why."""

    elapsed_s: float
    limit: int
    reason: str


class AdaptiveLimit:
    """`concurrency: auto`: finds the level that keeps the server's batch full, without a sweep.

    Driven by the server's /metrics when it has them (vLLM, llama.cpp --metrics), once per telemetry
    sample. While nothing has waited in the server's queue for two samples and the generation-token
    rate still rises, the limit doubles (slow start); otherwise it grows by one per sample. When more
    requests wait than a small allowance (a full batch plus a short queue is the goal) in two samples
    running, the KV cache is nearly full, or more than a few requests fail, it shrinks by a constant
    factor. Additive increase with multiplicative decrease makes runs that share a server converge to
    equal shares, as TCP flows do. Without metrics it falls back to a latency gradient in the spirit
    of Netflix's Gradient2: the limit shrinks in proportion to how far the recent latency per output
    token has risen above the run's baseline (its lowest recent median), and grows while it has not.
    """

    def __init__(
        self,
        max_limit: int = 256,
        initial_limit: int = 32,
        min_limit: int = 1,
        backoff: float = 0.85,
        queue_allowance: float = 0.2,
        min_queue: float = 2.0,
        kv_cache_high: float = 0.95,
        error_tolerance: float = 0.05,
        rate_gain: float = 0.02,
        latency_tolerance: float = 2.0,
        latency_window: int = 60,
        min_latency_samples: int = 3,
        smoothing: float = 0.5,
    ):
        if max_limit < 1:
            raise ValueError(f"the maximum concurrency must be at least 1, got {max_limit}")
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"min_limit must be between 1 and max_limit ({max_limit}), got {min_limit}")
        if not 0 < backoff < 1:
            raise ValueError(f"backoff must be between 0 and 1 (exclusive), got {backoff}")
        self.max_limit = max_limit
        self.min_limit = min_limit
        self.backoff = backoff
        self.queue_allowance = queue_allowance
        self.min_queue = min_queue
        self.kv_cache_high = kv_cache_high
        self.error_tolerance = error_tolerance
        self.rate_gain = rate_gain
        self.latency_tolerance = latency_tolerance
        self.min_latency_samples = min_latency_samples
        self.smoothing = smoothing
        self.slow_start = True
        self.changes: list[LimitChange] = []
        self._value = float(max(min_limit, min(max_limit, initial_limit)))
        self._responses = 0
        self._errors = 0
        self._latencies: list[float] = []
        self._baselines: deque[float] = deque(maxlen=latency_window)
        self._last_tokens: float | None = None
        self._last_elapsed: float | None = None
        self._last_rate: float | None = None
        self._last_waiting: float | None = None
        self._seen_server = False
        self._last_allowance = 0.0

    @property
    def limit(self) -> int:
        return max(self.min_limit, min(self.max_limit, int(self._value)))

    def describe(self) -> str:
        return f"auto (starting at {self.limit}, at most {self.max_limit})"

    def observe_response(self, latency_s: float, ok: bool, output_tokens: int = 0) -> None:
        self._responses += 1
        if not ok:
            self._errors += 1
        elif latency_s > 0:
            # Per output token, so long answers do not read as congestion; raw latency if usage is missing.
            self._latencies.append(latency_s / output_tokens if output_tokens > 0 else latency_s)

    def observe_metrics(self, metrics: ServerMetrics | None, elapsed_s: float) -> None:
        """One control step: called once per telemetry sample, with None when the server has no metrics."""
        responses, errors, latencies = self._responses, self._errors, self._latencies
        self._responses, self._errors, self._latencies = 0, 0, []
        rate = self._generation_rate(metrics, elapsed_s)

        if responses and errors / responses > self.error_tolerance:
            self._decrease(elapsed_s, f"{errors} of {responses} requests failed")
        elif metrics is None or metrics.waiting is None:
            self._follow_latency(latencies, elapsed_s)
        else:
            self._follow_server(metrics, rate, elapsed_s)
        if rate is not None:
            self._last_rate = rate

    # -- driven by the server's metrics ---------------------------------------------------------

    def _generation_rate(self, metrics: ServerMetrics | None, elapsed_s: float) -> float | None:
        """Output tokens per second since the previous sample, from vllm:generation_tokens_total."""
        total = metrics.generation_tokens_total if metrics else None
        rate = None
        if total is not None and self._last_tokens is not None and self._last_elapsed is not None:
            interval = elapsed_s - self._last_elapsed
            # A counter that went down belongs to a restarted server: no rate this time.
            if interval > 0 and total >= self._last_tokens:
                rate = (total - self._last_tokens) / interval
        self._last_tokens, self._last_elapsed = total, elapsed_s
        return rate

    def _follow_server(self, metrics: ServerMetrics, rate: float | None, elapsed_s: float) -> None:
        waiting = metrics.waiting or 0.0
        running = metrics.running or 0.0
        allowance = max(self.min_queue, self.queue_allowance * running)
        kv = metrics.kv_cache_usage
        previous_waiting, self._last_waiting = self._last_waiting, waiting
        previous_allowance, self._last_allowance = self._last_allowance, allowance
        if kv is not None and kv >= self.kv_cache_high:
            self._decrease(elapsed_s, f"KV cache {kv:.0%} full")
        elif not self._seen_server:
            # The first sample comes as the first requests land: their queue says nothing yet.
            self._seen_server = True
            self._last_waiting = None
        elif waiting > allowance and previous_waiting is not None and previous_waiting > previous_allowance:
            self._decrease(elapsed_s, f"{waiting:g} requests waiting (allowance {allowance:.0f})")
        elif waiting > allowance:
            # Requests that arrived since the last decode step wait until the next one: a queue seen once
            # may be such a burst. One that is still there a sample later is congestion.
            return
        elif waiting == 0 and not previous_waiting and self._rate_rising(rate):
            self._set(self._value * 2, elapsed_s, "server queue empty and throughput rising")
        else:
            self._set(self._value + 1, elapsed_s, "server queue within allowance")

    def _rate_rising(self, rate: float | None) -> bool:
        """Whether the generation-token rate still rises (by `rate_gain`); unknown counts as yes. A flat
        or falling rate with an empty queue means this run has no more work to fill a larger limit."""
        if rate is None or self._last_rate is None:
            return True
        return rate >= self._last_rate * (1 + self.rate_gain)

    # -- latency only (servers without metrics) ---------------------------------------------------

    def _follow_latency(self, latencies: list[float], elapsed_s: float) -> None:
        if len(latencies) < self.min_latency_samples:
            return  # too few answers in this interval to judge; keep the limit
        recent = statistics.median(latencies)
        self._baselines.append(recent)
        baseline = min(self._baselines)
        gradient = max(0.5, min(1.0, self.latency_tolerance * baseline / recent))
        if gradient >= 1.0:
            if self.slow_start:
                self._set(self._value * 2, elapsed_s, f"latency {recent / baseline:.2f}× baseline, slow start")
            else:
                self._set(self._value + math.sqrt(self._value), elapsed_s, f"latency {recent / baseline:.2f}× baseline")
            return
        self.slow_start = False
        target = self._value * gradient + math.sqrt(self._value)
        smoothed = (1 - self.smoothing) * self._value + self.smoothing * target
        self._set(smoothed, elapsed_s, f"latency {recent / baseline:.2f}× baseline (gradient {gradient:.2f})")

    # -- changes ---------------------------------------------------------------------------------

    def _decrease(self, elapsed_s: float, reason: str) -> None:
        self.slow_start = False
        self._set(self._value * self.backoff, elapsed_s, reason)

    def _set(self, value: float, elapsed_s: float, reason: str) -> None:
        before = self.limit
        self._value = max(float(self.min_limit), min(float(self.max_limit), value))
        if self.limit != before:
            self.changes.append(LimitChange(elapsed_s, self.limit, reason))


class ConcurrencyGate:
    """Admits a request only while fewer than `limiter.limit` are in flight, first come first served."""

    def __init__(self, limiter: ConcurrencyLimit):
        self.limiter = limiter
        self.in_flight = 0
        self.peak_in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Waits for a slot; a caller cancelled while waiting holds none."""
        if not self._waiters and self.in_flight < self.limiter.limit:
            self._admit()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Admitted just as it was cancelled: hand the slot on.
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info) -> None:
        self.release()

    async def limit_changed(self) -> None:
        self._wake()

    def _admit(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _wake(self) -> None:
        # Slots are handed over here, so in_flight never exceeds the limit even between wake-up and resume.
        while self._waiters and self.in_flight < self.limiter.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._admit()
                waiter.set_result(None)
