"""Concurrency sweep: throughput, latency and server load per level, and the level to use."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from qa_pipeline.core.client import LLMClient, ServerMetrics
from qa_pipeline.core.generation import GenerationSettings
from qa_pipeline.core.prompts import ParseError, parse_pairs, response_format
from qa_pipeline.core.storage import BENCHMARK_SCHEMA, Storage

DEFAULT_LEVELS: tuple[int, ...] = (1, 4, 8, 16, 32, 64)


@dataclass
class LevelResult:
    """What one concurrency level achieved."""

    concurrency: int
    requests: int = 0
    successes: int = 0
    valid: int = 0
    duration_s: float = 0.0
    output_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    metrics: list[ServerMetrics] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.successes / self.requests if self.requests else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0

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


async def run_level(
    client: LLMClient,
    prompts: Sequence[list[dict]],
    level: int,
    settings: GenerationSettings,
    n_requests: int,
    max_seconds: float,
    metrics_interval_s: float = 0.5,
) -> LevelResult:
    """Keeps `level` requests in flight (a queue, not batches) and samples the server meanwhile."""
    result = LevelResult(concurrency=level)
    schema = response_format()
    next_index = 0
    started = time.monotonic()

    async def worker() -> None:
        nonlocal next_index
        while next_index < n_requests and time.monotonic() - started < max_seconds:
            messages = prompts[next_index % len(prompts)]
            next_index += 1
            outcome = await client.chat(
                messages,
                response_format=schema,
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                seed=settings.seed,
            )
            result.requests += 1
            result.latencies.append(outcome.latency_s)
            result.output_tokens += outcome.completion_tokens
            if outcome.ok:
                result.successes += 1
                try:
                    parse_pairs(outcome.content, outcome.finish_reason)
                    result.valid += 1
                except ParseError:
                    pass

    async def sampler() -> None:
        while True:
            metrics = await client.metrics()
            if metrics is not None:
                result.metrics.append(metrics)
            await asyncio.sleep(metrics_interval_s)

    sampling = asyncio.create_task(sampler())
    try:
        await asyncio.gather(*(worker() for _ in range(level)))
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
    result.duration_s = time.monotonic() - started
    return result


async def sweep(
    client: LLMClient,
    prompts: Sequence[list[dict]],
    levels: Sequence[int],
    settings: GenerationSettings,
    max_seconds_per_level: float = 300.0,
    log: Callable[[str], None] = print,
) -> list[LevelResult]:
    """Runs each level in turn over the test sample's prompts."""
    if not prompts:
        raise ValueError("the concurrency benchmark needs at least one chunk in the test sample")
    results = []
    for position, level in enumerate(sorted(set(levels)), start=1):
        n = requests_for_level(level)
        log(f"concurrency benchmark: level {level} ({position}/{len(set(levels))}), {n} requests")
        result = await run_level(client, prompts, level, settings, n, max_seconds_per_level)
        log(
            f"concurrency benchmark: level {level}: {result.output_tokens_per_s:.1f} output tok/s, "
            f"{result.requests_per_s:.2f} req/s, success {result.success_rate:.0%}, "
            f"p50 {result.latency_percentile(50) or 0:.2f} s"
        )
        results.append(result)
    return results


def recommend_level(results: Sequence[LevelResult], tolerance: float = 0.05, min_success_rate: float = 0.9) -> int:
    """The smallest level whose throughput is within `tolerance` of the best healthy level."""
    healthy = [r for r in results if r.success_rate >= min_success_rate and r.output_tokens_per_s > 0]
    candidates = healthy or [r for r in results if r.requests]
    if not candidates:
        raise ValueError("no benchmark level completed a request; cannot recommend a concurrency")
    best = max(r.output_tokens_per_s for r in candidates)
    return min(r.concurrency for r in candidates if r.output_tokens_per_s >= (1 - tolerance) * best)


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


def plot_sweep(frame: pl.DataFrame, path: Path) -> Path:
    """Throughput and p50/p95 latency against concurrency, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = frame["concurrency"].to_list()
    fig, throughput_axis = plt.subplots(figsize=(7, 4), dpi=100)
    throughput_axis.plot(levels, frame["output_tokens_per_s"].to_list(), "o-", color="tab:blue", label="output tok/s")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def latest_recommendation(storage: Storage) -> int | None:
    """The level recommended by the most recent benchmark run, if any."""
    frame = storage.query(
        "SELECT concurrency FROM benchmark_runs WHERE recommended ORDER BY started_at DESC LIMIT 1"
    )
    return int(frame["concurrency"][0]) if frame.height else None
