"""How a generation run used the server, as figures and one PNG: throughput, concurrency, queue, KV cache."""

from __future__ import annotations

import io
from collections.abc import Sequence

from qa_pipeline.core.generation import TelemetrySample


def telemetry_summary(samples: Sequence[TelemetrySample]) -> dict[str, float]:
    """Peak and mean load of a run, from its telemetry samples (empty when nothing was sent)."""
    if not samples:
        return {}
    summary: dict[str, float] = {
        "concurrency_limit_final": samples[-1].limit,
        "concurrency_limit_mean": sum(s.limit for s in samples) / len(samples),
        "in_flight_max": max(s.in_flight for s in samples),
    }
    for name, values in (
        ("server_waiting", [s.server_waiting for s in samples if s.server_waiting is not None]),
        ("kv_cache_usage", [s.kv_cache_usage for s in samples if s.kv_cache_usage is not None]),
    ):
        if values:
            summary[f"{name}_max"] = max(values)
            summary[f"{name}_mean"] = sum(values) / len(values)
    return summary


def _rates(samples: Sequence[TelemetrySample]) -> tuple[list[float], list[float]]:
    """Output tokens per second between consecutive samples, at the later sample's time."""
    times, rates = [], []
    for before, after in zip(samples, samples[1:]):
        interval = after.elapsed_s - before.elapsed_s
        if interval > 0:
            times.append(after.elapsed_s)
            rates.append((after.output_tokens - before.output_tokens) / interval)
    return times, rates


def plot_generation_telemetry(samples: Sequence[TelemetrySample], title: str = "qa_pairs generation") -> bytes:
    """A PNG with three panels over the run's time: output tokens/s; concurrency limit, requests in
    flight and the server's running/waiting requests; the server's KV-cache use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    elapsed = [s.elapsed_s for s in samples]
    fig, (throughput, load, cache) = plt.subplots(
        3, 1, figsize=(7, 6), dpi=80, sharex=True, gridspec_kw={"height_ratios": [2, 2, 1]}
    )
    rate_times, rates = _rates(samples)
    throughput.plot(rate_times, rates, color="tab:blue")
    if samples and samples[-1].elapsed_s > 0:
        average = samples[-1].output_tokens / samples[-1].elapsed_s
        throughput.axhline(average, color="tab:blue", linestyle=":", label=f"run average {average:.0f}")
        throughput.legend(loc="lower right", fontsize=8)
    throughput.set_ylabel("output tokens/s")
    throughput.set_title(title)

    load.step(elapsed, [s.limit for s in samples], where="post", color="black", label="concurrency limit")
    load.plot(elapsed, [s.in_flight for s in samples], color="tab:green", label="in flight (this run)")
    running = [s.server_running for s in samples]
    waiting = [s.server_waiting for s in samples]
    if any(v is not None for v in running):
        load.plot(elapsed, [float("nan") if v is None else v for v in running], color="tab:orange",
                  label="server running")
    if any(v is not None for v in waiting):
        load.plot(elapsed, [float("nan") if v is None else v for v in waiting], color="tab:red",
                  label="server waiting")
    load.set_ylabel("requests")
    load.legend(loc="upper right", fontsize=8)

    kv = [s.kv_cache_usage for s in samples]
    if any(v is not None for v in kv):
        cache.plot(elapsed, [float("nan") if v is None else 100 * v for v in kv], color="tab:purple")
    else:
        cache.text(0.5, 0.5, "the server reports no KV-cache use", ha="center", va="center",
                   transform=cache.transAxes, fontsize=9)
    cache.set_ylabel("KV cache %")
    cache.set_ylim(0, 100)
    cache.set_xlabel("seconds since the first request")
    return png_bytes(plt, fig)


def png_bytes(plt, figure) -> bytes:
    """A finished matplotlib figure as PNG bytes; the figure is closed."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
