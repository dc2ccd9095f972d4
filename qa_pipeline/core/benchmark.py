"""Concurrency sweep through the production dispatch loop: sustained throughput, latency and server
load per level, and the level to use."""

from __future__ import annotations

import asyncio
import io
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl

from qa_pipeline.core.client import ChatOutcome, LLMClient, ServerMetrics
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.dispatch import Dispatcher
from qa_pipeline.core.generation import GenerationInterrupted, GenerationSettings, stop_on_signals
from qa_pipeline.core.prompts import ParseError, parse_pairs
from qa_pipeline.core.settings import BENCHMARK_REUSE_DAYS
from qa_pipeline.core.storage import BENCHMARK_SCHEMA, Storage

DEFAULT_LEVELS: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
REUSE_FOR = timedelta(days=BENCHMARK_REUSE_DAYS)  # `--rebenchmark` sweeps again sooner
# The name benchmark results of the embedded server are recorded under (its port changes at each start).
EMBEDDED_SERVER_NAME = "embedded"


@dataclass(frozen=True)
class RequestSpan:
    """One benchmark request: when it was sent and answered (time.monotonic()) and what it produced."""

    sent_at: float
    answered_at: float
    output_tokens: int


@dataclass
class LevelResult:
    """What one concurrency level achieved: over the whole level, and sustained (see `sustained_window`)."""

    concurrency: int
    requests: int = 0
    successes: int = 0
    valid: int = 0
    duration_s: float = 0.0
    output_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    metrics: list[ServerMetrics] = field(default_factory=list)
    sustained_s: float = 0.0  # length of the steady-state window; 0 when the level had none
    sustained_requests: float = 0.0
    sustained_output_tokens: float = 0.0

    @property
    def success_rate(self) -> float:
        return self.successes / self.requests if self.requests else 0.0

    @property
    def requests_per_s(self) -> float:
        """Over the whole level, ramp-up and drain included."""
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        """Over the whole level, ramp-up and drain included."""
        return self.output_tokens / self.duration_s if self.duration_s else 0.0

    @property
    def sustained_requests_per_s(self) -> float | None:
        return self.sustained_requests / self.sustained_s if self.sustained_s > 0 else None

    @property
    def sustained_output_tokens_per_s(self) -> float | None:
        return self.sustained_output_tokens / self.sustained_s if self.sustained_s > 0 else None

    @property
    def steady_output_tokens_per_s(self) -> float:
        """The sustained rate; the whole-level rate for a level too short to have a steady state."""
        sustained = self.sustained_output_tokens_per_s
        return self.output_tokens_per_s if sustained is None else sustained

    def latency_percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]

    def metric_series(self, name: str) -> list[float]:
        return [v for m in self.metrics if (v := getattr(m, name)) is not None]

    @property
    def has_vllm_metrics(self) -> bool:
        return any(m.has_vllm_metrics for m in self.metrics)


def requests_for_level(level: int, minimum: int = 8, per_slot: int = 3) -> int:
    """Enough requests to keep `level` slots busy for several rounds."""
    return max(minimum, per_slot * level)


def sustained_window(spans: Sequence[RequestSpan], level: int, last_sent_at: float | None) -> tuple[float, float] | None:
    """The steady state of a level: from its `level`-th answer to the moment its last request was sent.

    Before it, the level's first `level` requests, all sent at once, are still being answered (the
    ramp-up: a synchronized wave, not yet the staggered mix of a long run); after it nothing new is
    sent and the in-flight count only falls (the drain). Inside it the dispatch loop keeps exactly
    `level` requests in flight. None when the level was too short to have one.
    """
    answers = sorted(span.answered_at for span in spans)
    if last_sent_at is None or len(answers) < level:
        return None
    start = answers[level - 1]
    return (start, last_sent_at) if last_sent_at > start else None


def rates_in_window(spans: Sequence[RequestSpan], start: float, end: float) -> tuple[float, float]:
    """Requests and output tokens inside [start, end]: each request counts in proportion to the part
    of its own span (sent to answered) that falls inside, since a server works on a request for its
    whole span. A time average of this kind equals the completion rate (Little's law), without the
    lumps of counting whole answers in a short window."""
    requests = tokens = 0.0
    for span in spans:
        length = span.answered_at - span.sent_at
        overlap = min(end, span.answered_at) - max(start, span.sent_at)
        if length <= 0:
            share = 1.0 if start <= span.answered_at < end else 0.0
        else:
            share = max(0.0, overlap) / length
        requests += share
        tokens += share * span.output_tokens
    return requests, tokens


async def run_level(
    client: LLMClient,
    prompts: Sequence[list[dict]],
    level: int,
    settings: GenerationSettings,
    n_requests: int,
    max_seconds: float,
    metrics_interval_s: float = 0.5,
    interrupt: asyncio.Event | None = None,
) -> LevelResult:
    """Sends `n_requests` through the dispatch loop at a fixed limit of `level`, as generation does,
    sampling the server meanwhile; no request starts after `max_seconds`, those in flight finish.
    Once `interrupt` is set, nothing starts and nothing in flight is waited for.

    A level whose first `level` answers take longer than `max_seconds` (long answers on a slow
    server) would end before its steady state begins and measure only its ramp-up: its sending then
    goes on until half of `max_seconds` after its `level`-th answer, so that it has one."""
    result = LevelResult(concurrency=level)
    schema = settings.schema()
    spans: list[RequestSpan] = []
    stop = asyncio.Event()
    dispatcher = Dispatcher(FixedLimit(level), stop=stop, abandon=interrupt)

    async def relay_interrupt() -> None:
        if interrupt is not None:
            await interrupt.wait()
            stop.set()

    async def send(messages: list[dict]) -> tuple[ChatOutcome, RequestSpan]:
        sent_at = time.monotonic()
        outcome = await client.chat(
            messages,
            response_format=schema,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            seed=settings.seed,
        )
        return outcome, RequestSpan(sent_at, time.monotonic(), outcome.completion_tokens)

    loop = asyncio.get_running_loop()
    past_deadline = False
    steady_window_s = max_seconds / 2

    def at_deadline() -> None:
        nonlocal past_deadline
        past_deadline = True
        if len(spans) >= level:  # the steady state began: end it no sooner than steady_window_s after its start
            steady_since = sorted(span.answered_at for span in spans)[level - 1]
            loop.call_later(max(0.0, steady_since + steady_window_s - time.monotonic()), stop.set)

    def answered(_: list[dict], sent: tuple[ChatOutcome, RequestSpan]) -> None:
        outcome, span = sent
        spans.append(span)
        if past_deadline and len(spans) == level:  # the steady state begins only now
            loop.call_later(steady_window_s, stop.set)
        result.requests += 1
        result.latencies.append(outcome.latency_s)
        result.output_tokens += outcome.completion_tokens
        if outcome.ok:
            result.successes += 1
            try:
                parse_pairs(outcome.content, outcome.finish_reason, settings.question_types)
                result.valid += 1
            except ParseError:
                pass

    async def sampler() -> None:
        while True:
            metrics = await client.metrics()
            if metrics is not None:
                result.metrics.append(metrics)
            await asyncio.sleep(metrics_interval_s)

    sampling, relay = asyncio.create_task(sampler()), asyncio.create_task(relay_interrupt())
    deadline = loop.call_later(max_seconds, at_deadline)
    try:
        dispatched = await dispatcher.run((prompts[i % len(prompts)] for i in range(n_requests)), send, answered)
    finally:
        deadline.cancel()
        sampling.cancel()
        relay.cancel()
        await asyncio.gather(sampling, relay, return_exceptions=True)
    result.duration_s = dispatched.ended_at - dispatched.began_at
    window = sustained_window(spans, level, dispatched.last_start_at)
    if window is not None:
        result.sustained_s = window[1] - window[0]
        result.sustained_requests, result.sustained_output_tokens = rates_in_window(spans, *window)
    return result


async def sweep(
    client: LLMClient,
    prompts: Sequence[list[dict]],
    levels: Sequence[int],
    settings: GenerationSettings,
    max_seconds_per_level: float = 300.0,
    log: Callable[[str], None] = print,
) -> list[LevelResult]:
    """Runs each level in turn over the test sample's prompts.

    SIGINT/SIGTERM (or the command line's stop request) end it at once: a sweep cut short measures
    nothing worth keeping, so requests in flight are abandoned and GenerationInterrupted is raised.
    """
    if not prompts:
        raise ValueError("the concurrency benchmark needs at least one chunk in the test sample")
    results, interrupt = [], asyncio.Event()
    with stop_on_signals(interrupt, interrupt, log):
        for position, level in enumerate(sorted(set(levels)), start=1):
            n = requests_for_level(level)
            log(f"concurrency benchmark: level {level} ({position}/{len(set(levels))}), {n} requests")
            result = await run_level(client, prompts, level, settings, n, max_seconds_per_level, interrupt=interrupt)
            if interrupt.is_set():
                break
            sustained = result.sustained_output_tokens_per_s
            log(
                f"concurrency benchmark: level {level}: "
                + ("no steady state (too few requests), " if sustained is None else f"{sustained:.1f} output tok/s sustained, ")
                + f"{result.output_tokens_per_s:.1f} over the whole level, "
                f"{result.requests_per_s:.2f} req/s, success {result.success_rate:.0%}, "
                f"p50 {result.latency_percentile(50) or 0:.2f} s"
            )
            results.append(result)
    if interrupt.is_set():
        raise GenerationInterrupted("the concurrency benchmark was stopped; nothing of it is kept")
    return results


def recommend_level(results: Sequence[LevelResult], tolerance: float = 0.05, min_success_rate: float = 0.9) -> int:
    """The smallest level whose sustained throughput is within `tolerance` of the best healthy level's."""
    healthy = [r for r in results if r.success_rate >= min_success_rate and r.steady_output_tokens_per_s > 0]
    candidates = healthy or [r for r in results if r.requests]
    if not candidates:
        raise ValueError("no benchmark level completed a request; cannot recommend a concurrency")
    best = max(r.steady_output_tokens_per_s for r in candidates)
    return min(r.concurrency for r in candidates if r.steady_output_tokens_per_s >= (1 - tolerance) * best)


def results_frame(
    results: Sequence[LevelResult], run_id: str, model: str, endpoint: str, recommended: int
) -> pl.DataFrame:
    started = datetime.now(UTC)

    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    rows = [
        {
            "run_id": run_id,
            "started_at": started,
            "model": model,
            "endpoint": endpoint,
            "concurrency": r.concurrency,
            "requests": r.requests,
            "successes": r.successes,
            "success_rate": r.success_rate,
            "duration_s": r.duration_s,
            "requests_per_s": r.requests_per_s,
            "output_tokens_per_s": r.output_tokens_per_s,
            "sustained_s": r.sustained_s,
            "sustained_requests_per_s": r.sustained_requests_per_s,
            "sustained_output_tokens_per_s": r.sustained_output_tokens_per_s,
            "latency_p50_s": r.latency_percentile(50),
            "latency_p95_s": r.latency_percentile(95),
            "latency_p99_s": r.latency_percentile(99),
            "server_running_mean": mean(r.metric_series("running")),
            "server_running_max": max(r.metric_series("running"), default=None),
            "server_waiting_mean": mean(r.metric_series("waiting")),
            "server_waiting_max": max(r.metric_series("waiting"), default=None),
            "kv_cache_usage_mean": mean(r.metric_series("kv_cache_usage")),
            "kv_cache_usage_max": max(r.metric_series("kv_cache_usage"), default=None),
            "metric_samples": len(r.metrics),
            "recommended": r.concurrency == recommended,
        }
        for r in results
    ]
    return pl.DataFrame(rows, schema=BENCHMARK_SCHEMA)


def plot_sweep(frame: pl.DataFrame) -> bytes:
    """Throughput (sustained and whole-level) and p50/p95 latency against concurrency, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = frame["concurrency"].to_list()
    fig, throughput_axis = plt.subplots(figsize=(7, 4), dpi=100)
    # A level without a steady state has no sustained figure: a gap in that line.
    sustained = frame["sustained_output_tokens_per_s"].fill_null(float("nan")).to_list()
    throughput_axis.plot(levels, sustained, "o-", color="tab:blue", label="output tok/s, sustained")
    throughput_axis.plot(
        levels, frame["output_tokens_per_s"].to_list(), "o:", color="tab:blue", alpha=0.5, label="output tok/s, whole level"
    )
    throughput_axis.set_xscale("log", base=2)
    throughput_axis.set_xlabel("concurrency (requests in flight)")
    throughput_axis.set_ylabel("output tokens/s", color="tab:blue")
    latency_axis = throughput_axis.twinx()
    latency_axis.plot(levels, frame["latency_p50_s"].to_list(), "s--", color="tab:orange", label="p50 latency")
    latency_axis.plot(levels, frame["latency_p95_s"].to_list(), "^:", color="tab:red", label="p95 latency")
    latency_axis.set_ylabel("latency (s)", color="tab:red")
    recommended = frame.filter(pl.col("recommended"))["concurrency"].to_list()
    if recommended:
        throughput_axis.axvline(recommended[0], color="green", alpha=0.4, label=f"recommended {recommended[0]}")
    fig.legend(loc="upper left", fontsize=8)
    throughput_axis.set_title("Concurrency sweep")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


@dataclass(frozen=True)
class Recommendation:
    """The level a benchmark run recommended, and when that run started."""

    concurrency: int
    started_at: datetime

    def age(self, now: datetime | None = None) -> timedelta:
        started = self.started_at if self.started_at.tzinfo else self.started_at.replace(tzinfo=UTC)
        return (now or datetime.now(UTC)) - started


def latest_benchmark(storage: Storage, model: str | None = None, server: str | None = None) -> Recommendation | None:
    """The most recent benchmark run of this model on this server (None: any), if any.

    A level measured on another model or server says nothing about this one, so it is not reused.
    """
    conditions, parameters = ["recommended"], []
    for column, value in (("model", model), ("endpoint", server)):
        if value is not None:
            conditions.append(f"{column} = ?")
            parameters.append(value)
    query = (
        f"SELECT concurrency, started_at FROM benchmark_runs WHERE {' AND '.join(conditions)} "
        "ORDER BY started_at DESC LIMIT 1"
    )
    with storage.connect() as connection:
        frame = connection.sql(query, params=parameters).pl()
    return Recommendation(int(frame["concurrency"][0]), frame["started_at"][0]) if frame.height else None


def latest_recommendation(storage: Storage, model: str | None = None, server: str | None = None) -> int | None:
    """The level recommended by the most recent benchmark run of this model on this server, if any."""
    found = latest_benchmark(storage, model, server)
    return found.concurrency if found else None


def reusable_benchmark(storage: Storage, model: str | None, server: str | None) -> Recommendation | None:
    """The latest benchmark of this model on this server if it is recent enough to stand (REUSE_FOR)."""
    found = latest_benchmark(storage, model, server)
    return found if found is not None and found.age() <= REUSE_FOR else None
