"""The simulator's capacity model: continuous batching on a wall-clock engine loop."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

from qa_pipeline.simulator.config import SimulatorConfig

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


class Engine:
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
