"""Progress of long work as count, rate and ETA, reported at a steady interval to any log function."""

from __future__ import annotations

import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Counts finished items and tells `log` how far along the work is, at most every `interval_s`."""

    def __init__(self, label: str, total: int, log: Callable[[str], None], interval_s: float = 10.0):
        self.label = label
        self.total = total
        self.log = log
        self.interval_s = interval_s
        self.done = 0
        self.failed = 0
        self.cached = 0
        self.output_tokens = 0
        self.started = time.monotonic()
        self._last_report = self.started
        self._reported_done = -1

    def advance(self, *, failed: bool = False, cached: bool = False, output_tokens: int = 0) -> None:
        self.done += 1
        self.failed += failed
        self.cached += cached
        self.output_tokens += output_tokens
        now = time.monotonic()
        if now - self._last_report >= self.interval_s:
            self._report(now)

    def finish(self) -> None:
        """The closing line, unless the last periodic report already said the same."""
        if self._reported_done != self.done:
            self._report(time.monotonic())

    def _report(self, now: float) -> None:
        self._last_report = now
        self._reported_done = self.done
        self.log(self.line())

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def line(self) -> str:
        elapsed = max(self.elapsed_s, 1e-9)
        fresh = self.done - self.cached
        rate = fresh / elapsed
        remaining = self.total - self.done
        eta = format_duration(remaining / rate) if rate > 0 else "unknown"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done}/{self.total} ({percent:.0f}%), {rate:.1f}/s, "
            f"{self.output_tokens / elapsed:.0f} output tok/s, ETA {eta}, "
            f"{self.failed} failed, {self.cached} from cache, elapsed {format_duration(elapsed)}"
        )
