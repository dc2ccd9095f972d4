"""The client reads a server's /metrics per metric: KV cache usage is the fullest engine's, request and
token counts add up over engines, only the configured model's series count, and timestamps are not values."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from qa_pipeline.core.client import ClientConfig, LLMClient, ServerMetrics
from qa_pipeline.core.concurrency import AdaptiveLimit
from qa_pipeline_tests.loopback import serve_app

MODEL = "Qwen/Qwen2.5-7B-Instruct"

# /metrics of `vllm serve Qwen/Qwen2.5-7B-Instruct --data-parallel-size 2` (abridged): one series per
# engine. The KV cache lines carry a timestamp (as a Prometheus federation or a proxy may add).
TWO_ENGINES = f"""\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 12034.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 24.0
vllm:num_requests_running{{engine="1",model_name="{MODEL}"}} 23.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 1.0
vllm:num_requests_waiting{{engine="1",model_name="{MODEL}"}} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 0.5 1718000000000
vllm:kv_cache_usage_perc{{engine="1",model_name="{MODEL}"}} 0.48 1718000000000
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="{MODEL}"}} 150000.0
vllm:generation_tokens_total{{engine="1",model_name="{MODEL}"}} 149000.0
vllm:generation_tokens_created{{engine="0",model_name="{MODEL}"}} 1.718e+09
vllm:generation_tokens_created{{engine="1",model_name="{MODEL}"}} 1.718e+09
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="1.0",model_name="{MODEL}"}} 3.0
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="+Inf",model_name="{MODEL}"}} 900.0
vllm:e2e_request_latency_seconds_count{{engine="0",model_name="{MODEL}"}} 900.0
vllm:e2e_request_latency_seconds_sum{{engine="0",model_name="{MODEL}"}} 5400.0
"""

# A server (a router in front of two deployments) reporting two models on one page.
TWO_MODELS = f"""\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 5.0
vllm:num_requests_running{{engine="0",model_name="mistral-small"}} 60.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 0.0
vllm:num_requests_waiting{{engine="0",model_name="mistral-small"}} 30.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 0.1
vllm:kv_cache_usage_perc{{engine="0",model_name="mistral-small"}} 0.97
"""


@asynccontextmanager
async def serving(page: str) -> AsyncIterator[str]:
    """`page` as /metrics of a real HTTP server on loopback; yields its base URL."""
    app = web.Application()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/plain", charset="utf-8")

    app.router.add_get("/metrics", metrics)
    async with serve_app(app) as root:
        yield f"{root}/v1"


def read_metrics(page: str, model: str | None = MODEL) -> ServerMetrics | None:
    async def read() -> ServerMetrics | None:
        async with serving(page) as base_url, LLMClient(ClientConfig(base_urls=[base_url], model=model)) as client:
            return await client.metrics()

    return asyncio.run(read())


def test_two_engines_half_full_read_as_half_full_and_their_requests_and_tokens_add_up():
    metrics = read_metrics(TWO_ENGINES)
    assert metrics.kv_cache_usage == 0.5  # the fullest engine; not 0.98, and not the timestamp
    assert metrics.running == 47
    assert metrics.waiting == 3
    assert metrics.generation_tokens_total == 299000
    assert metrics.has_vllm_metrics


def test_the_adaptive_limit_does_not_shrink_for_a_kv_cache_that_is_only_half_full_on_each_engine():
    limit = AdaptiveLimit(initial_limit=32)
    metrics = read_metrics(TWO_ENGINES)
    for elapsed_s in (1.0, 2.0, 3.0):
        limit.observe_metrics(metrics, elapsed_s)
    assert limit.limit >= 32
    assert not any("KV cache" in change.reason for change in limit.changes)


def test_only_the_configured_models_series_count_when_a_server_reports_several():
    metrics = read_metrics(TWO_MODELS)
    assert (metrics.running, metrics.waiting, metrics.kv_cache_usage) == (5, 0, 0.1)
    other = read_metrics(TWO_MODELS, model="mistral-small")
    assert (other.running, other.waiting, other.kv_cache_usage) == (60, 30, 0.97)


def test_a_model_served_under_an_alias_still_reads_the_servers_figures():
    # vLLM labels its series with the first --served-model-name; a client may use another one.
    metrics = read_metrics(TWO_ENGINES, model="qwen-7b")
    assert (metrics.running, metrics.kv_cache_usage) == (47, 0.5)


def test_a_page_that_is_not_prometheus_text_reads_as_no_metrics():
    assert read_metrics("<html><body>Sign in to continue</body></html>") is None
