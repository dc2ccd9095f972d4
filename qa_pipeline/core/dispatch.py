"""The dispatch loop: keeps as many requests in flight as the concurrency limit allows, starting the
next work item the moment one finishes. Generation, the concurrency benchmark and the judge all use it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from qa_pipeline.core.concurrency import ConcurrencyGate, ConcurrencyLimit

Item = TypeVar("Item")
Result = TypeVar("Result")
_END = object()


class StalledError(RuntimeError):
    """No work item finished for longer than the configured stall timeout."""


@dataclass
class DispatchReport:
    """What one dispatch run did. Times are `time.monotonic()` readings."""

    began_at: float
    ended_at: float = 0.0
    started: int = 0
    finished: int = 0
    abandoned: int = 0
    items_left: bool = False  # a stop came before every item was started
    first_full_at: float | None = None  # when the limit was first reached
    last_start_at: float | None = None  # when the last item was started: the drain begins

    @property
    def stopped(self) -> bool:
        """Whether a stop left work undone (items never started, or requests abandoned)."""
        return self.items_left or self.abandoned > 0


class Dispatcher(Generic[Item, Result]):
    """Runs `handle(item)` for every item, with at most `limit.limit` running at once, no batches.

    A stop (`stop` set) starts no further item and lets those in flight finish for up to
    `stop_grace_s` (None: as long as they take) or until `abandon` is set; what is still in flight
    then is cancelled. When no item finishes for `stall_timeout_s`, `StalledError` is raised with
    `stall_message(in_flight)`. An exception from `handle` or `on_done` ends the run and is raised.
    """

    def __init__(
        self,
        limit: ConcurrencyLimit,
        *,
        stop: asyncio.Event | None = None,
        abandon: asyncio.Event | None = None,
        stop_grace_s: float | None = None,
        stall_timeout_s: float | None = None,
        stall_message: Callable[[int], str] | None = None,
        log: Callable[[str], None] = print,
        poll_interval_s: float = 1.0,
    ):
        self.limit = limit
        self.gate = ConcurrencyGate(limit)
        self.stop = stop if stop is not None else asyncio.Event()
        self.abandon = abandon if abandon is not None else asyncio.Event()
        self.stop_grace_s = stop_grace_s
        self.stall_timeout_s = stall_timeout_s
        self.stall_message = stall_message or (
            lambda in_flight: f"STALLED: no request finished in {stall_timeout_s:g} s ({in_flight} in flight)"
        )
        self.log = log
        self.poll_interval_s = poll_interval_s

    @property
    def in_flight(self) -> int:
        return self.gate.in_flight

    async def run(
        self,
        items: Iterable[Item],
        handle: Callable[[Item], Awaitable[Result]],
        on_done: Callable[[Item, Result], None] | None = None,
    ) -> DispatchReport:
        """Dispatches every item (until a stop); `on_done(item, result)` runs as each one finishes."""
        report = DispatchReport(began_at=time.monotonic())
        iterator = iter(items)
        running: set[asyncio.Task] = set()
        failures: list[BaseException] = []
        wake = asyncio.Event()  # the supervisor has something to look at
        filling, exhausted = True, False
        last_finish = report.began_at

        def settled(task: asyncio.Task, item: Item) -> None:
            nonlocal last_finish
            # Released here rather than inside the task: a task cancelled before it ever ran holds its slot too.
            self.gate.release()
            running.discard(task)
            if task.cancelled():
                return
            last_finish = time.monotonic()
            report.finished += 1
            error = task.exception()
            if error is None and on_done is not None:
                try:
                    on_done(item, task.result())
                except Exception as raised:  # handed to the supervisor, which raises it
                    error = raised
            if error is not None:
                failures.append(error)
                wake.set()
            elif not filling and not running:
                wake.set()

        async def fill() -> None:
            nonlocal filling, exhausted
            try:
                while not self.stop.is_set():
                    await self.gate.acquire()
                    item = _END if self.stop.is_set() else next(iterator, _END)
                    if item is _END:
                        self.gate.release()
                        exhausted = not self.stop.is_set()
                        return
                    now = time.monotonic()
                    task = asyncio.ensure_future(handle(item))
                    running.add(task)
                    task.add_done_callback(lambda done, item=item: settled(done, item))
                    report.started += 1
                    report.last_start_at = now
                    if report.first_full_at is None and self.gate.in_flight >= self.limit.limit:
                        report.first_full_at = now
            finally:
                filling = False
                wake.set()

        async def relay_stop() -> None:
            await self.stop.wait()
            wake.set()

        filler = asyncio.create_task(fill())
        stop_watch = asyncio.create_task(relay_stop())
        try:
            while True:
                if failures:
                    raise failures[0]
                if filler.done() and filler.exception() is not None:
                    raise filler.exception()  # the items could not be read
                if filler.done() and not running:
                    filler.result()
                    report.items_left = not exhausted and next(iterator, _END) is not _END
                    break
                if self.stall_timeout_s is not None and time.monotonic() - last_finish > self.stall_timeout_s:
                    raise StalledError(self.stall_message(self.gate.in_flight))
                if self.stop.is_set():
                    filler.cancel()
                    await asyncio.gather(filler, return_exceptions=True)
                    report.items_left = not exhausted and next(iterator, _END) is not _END
                    report.abandoned = await self._finish_in_flight(running)
                    if failures:
                        raise failures[0]
                    break
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), self.poll_interval_s)
                except TimeoutError:
                    pass
        finally:
            leftovers = [filler, stop_watch, *running]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            report.ended_at = time.monotonic()
        return report

    async def _finish_in_flight(self, running: set[asyncio.Task]) -> int:
        """Lets requests already sent finish for up to `stop_grace_s`, or until `abandon` is set;
        returns how many are still in flight and will be abandoned."""
        pending = set(running)
        abandoned = asyncio.create_task(self.abandon.wait())
        try:
            deadline = None if self.stop_grace_s is None else time.monotonic() + self.stop_grace_s
            while pending and not self.abandon.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                if left is not None:
                    self.log(f"waiting up to {left:.0f} s for {len(pending)} requests in flight")
                _, pending = await asyncio.wait(
                    pending | {abandoned},
                    timeout=None if left is None else min(left, 10.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                pending.discard(abandoned)
        finally:
            abandoned.cancel()
        return len(pending)
