"""How many requests may be in flight: a fixed limit, and the gate that workers pass through."""

from __future__ import annotations

import asyncio

from qa_pipeline.core.client import ServerMetrics


class FixedLimit:
    """A constant concurrency limit (a configured value or the benchmark's recommendation)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"concurrency must be at least 1, got {limit}")
        self.limit = limit
        self.max_limit = limit

    def observe_response(self, latency_s: float, ok: bool) -> None:
        """A fixed limit ignores feedback; adaptive limits override this."""

    def observe_metrics(self, metrics: ServerMetrics | None, elapsed_s: float) -> None:
        """A fixed limit ignores feedback; adaptive limits override this."""


class ConcurrencyGate:
    """Admits a worker's request only while fewer than `limiter.limit` are in flight."""

    def __init__(self, limiter: FixedLimit):
        self.limiter = limiter
        self.in_flight = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.limiter.limit)
            self.in_flight += 1

    async def __aexit__(self, *exc_info) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    async def limit_changed(self) -> None:
        async with self._changed:
            self._changed.notify_all()
