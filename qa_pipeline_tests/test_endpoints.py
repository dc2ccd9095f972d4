"""Several endpoints behind one client: least-loaded choice, metrics weighting, taking out and putting back."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter

import pytest

from qa_pipeline.core.client import ClientConfig, LLMClient, ServerError
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.prompts import build_messages, response_format

FAST = {"max_num_seqs": 16, "step_base_ms": 2, "output_tokens_mean": 40, "output_tokens_max": 80}


def question(index: int) -> list[dict[str, str]]:
    return build_messages(f"Passage {index}. The worker sends request {index} to the server, which answers it.")


def client_for(*base_urls: str, **overrides) -> LLMClient:
    settings = {"endpoint_cooldown_s": 0.2, "probe_interval_max_s": 0.5, "backoff_base_s": 0.05, **overrides}
    return LLMClient(ClientConfig(base_urls=[f"{url}/v1" for url in base_urls], **settings))


async def send_all(client: LLMClient, count: int, concurrency: int, first: int = 0) -> list:
    """`count` chats through `concurrency` workers, as the generator's work queue sends them."""
    queue = list(range(first, first + count))
    outcomes = []

    async def worker() -> None:
        while queue:
            outcomes.append(await client.chat(question(queue.pop()), response_format=response_format(), max_tokens=80))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_requests_spread_evenly_over_equally_loaded_endpoints(simulator):
    sims = [simulator(**FAST) for _ in range(3)]

    async def scenario():
        async with client_for(*(s.base_url for s in sims)) as client:
            await client.resolve_model()
            return await send_all(client, 60, concurrency=6)

    outcomes = asyncio.run(scenario())

    assert all(o.ok for o in outcomes)
    by_endpoint = Counter(o.endpoint for o in outcomes)
    assert sorted(by_endpoint) == sorted(s.openai_base_url for s in sims)
    for sim in sims:
        assert 15 <= sim.stats()["requests_total"] <= 25, by_endpoint


def test_an_endpoint_whose_metrics_show_a_queue_gets_no_new_requests(simulator):
    # The busy replica is shared with another client (another run): only its /metrics tell.
    busy = simulator(max_num_seqs=2, step_base_ms=20, output_tokens_mean=50, output_tokens_min=50, output_tokens_max=50)
    idle = simulator(**FAST)

    async def scenario():
        async with client_for(busy.base_url) as other_run, client_for(busy.base_url, idle.base_url) as client:
            await other_run.resolve_model()
            await client.resolve_model()
            flood = asyncio.ensure_future(send_all(other_run, 12, concurrency=12, first=1000))
            while (await asyncio.to_thread(busy.stats))["waiting"] < 6:
                await asyncio.sleep(0.05)
            per_endpoint = await client.endpoint_metrics()
            combined = await client.metrics()
            outcomes = await send_all(client, 8, concurrency=2)
            await flood
            return per_endpoint, combined, outcomes

    per_endpoint, combined, outcomes = asyncio.run(scenario())

    assert per_endpoint[busy.openai_base_url].waiting >= 6
    assert per_endpoint[idle.openai_base_url].running == 0
    assert combined.waiting == per_endpoint[busy.openai_base_url].waiting + per_endpoint[idle.openai_base_url].waiting
    assert combined.has_vllm_metrics
    assert all(o.ok for o in outcomes)
    assert Counter(o.endpoint for o in outcomes) == {idle.openai_base_url: 8}


def test_a_killed_endpoint_is_taken_out_and_put_back_after_restart(simulator):
    sims = [simulator(max_num_seqs=16, step_base_ms=5, output_tokens_mean=40, output_tokens_max=80) for _ in range(3)]
    victim = sims[1]

    async def scenario():
        async with client_for(*(s.base_url for s in sims)) as client:
            await client.resolve_model()
            endpoint = client.endpoints[1]
            stop = asyncio.Event()
            outcomes: list = []

            async def worker(index: int) -> None:
                while not stop.is_set():
                    outcome = await client.chat(question(index), response_format=response_format(), max_tokens=80)
                    outcomes.append((time.monotonic(), outcome))
                    index += 100

            workers = [asyncio.ensure_future(worker(i)) for i in range(6)]
            while len(outcomes) < 30:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(victim.kill)
            killed_at = time.monotonic()
            while endpoint.healthy and time.monotonic() - killed_at < 5:
                await asyncio.sleep(0.02)
            taken_out = not endpoint.healthy
            await asyncio.sleep(1.0)  # traffic goes on without it
            await asyncio.to_thread(victim.restart)
            restarted_at = time.monotonic()
            while not endpoint.healthy and time.monotonic() - restarted_at < 10:
                await asyncio.sleep(0.02)
            back_after_s = time.monotonic() - restarted_at
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*workers)
            return endpoint, taken_out, back_after_s, killed_at, restarted_at, outcomes

    endpoint, taken_out, back_after_s, killed_at, restarted_at, outcomes = asyncio.run(scenario())

    assert taken_out, "the endpoint was still marked healthy 5 s after its server was killed"
    assert endpoint.taken_out == 1 and endpoint.put_back == 1
    assert back_after_s < 3, f"the restarted endpoint was put back only after {back_after_s:.1f} s"
    assert all(o.ok for _, o in outcomes), [o.error for _, o in outcomes if not o.ok]
    # While it was out (once requests in flight at the kill had been retried), nothing was sent to it.
    settled = killed_at + 0.5
    down = [o for t, o in outcomes if settled < t < restarted_at]
    assert down and all(o.endpoint != victim.openai_base_url for o in down)
    # After the restart it takes its share again: the new server process counts its own requests.
    assert victim.stats()["requests_total"] > 0
    assert any(o.endpoint == victim.openai_base_url for t, o in outcomes if t > restarted_at + back_after_s)


class RecordingLimit(FixedLimit):
    """A fixed per-endpoint limit that remembers the feedback it was given."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.responses: list[bool] = []
        self.metrics: list = []

    def observe_response(self, latency_s: float, ok: bool, output_tokens: int = 0) -> None:
        self.responses.append(ok)

    def observe_metrics(self, metrics, elapsed_s: float) -> None:
        self.metrics.append(metrics)


def test_each_endpoint_keeps_its_own_concurrency_limit_and_feedback(simulator):
    sims = [simulator(max_num_seqs=16, step_base_ms=10, output_tokens_mean=30, output_tokens_min=30,
                      output_tokens_max=30) for _ in range(2)]
    limits: dict[str, RecordingLimit] = {}

    def limit_for(base_url: str) -> RecordingLimit:
        return limits.setdefault(base_url, RecordingLimit(2))

    async def scenario():
        config = ClientConfig(base_urls=[s.openai_base_url for s in sims])
        async with LLMClient(config, endpoint_limit=limit_for) as client:
            await client.resolve_model()
            await client.metrics()
            return await send_all(client, 12, concurrency=12)

    outcomes = asyncio.run(scenario())

    assert all(o.ok for o in outcomes)
    for sim in sims:
        stats = sim.stats()
        assert stats["peak_running"] <= 2
        limit = limits[sim.openai_base_url]
        assert len(limit.responses) == stats["requests_total"] >= 3  # its own answers only
        assert len(limit.metrics) == 1 and limit.metrics[0].running == 0
    assert sum(len(limit.responses) for limit in limits.values()) == 12


def test_the_model_is_resolved_from_a_live_endpoint_while_another_is_down(simulator):
    live = simulator(**FAST)
    dead = f"http://127.0.0.1:{free_port()}"

    async def scenario():
        async with client_for(dead, live.base_url) as client:
            model = await client.resolve_model()
            outcomes = await send_all(client, 4, concurrency=2)
            return model, client.endpoints[0], outcomes

    model, dead_endpoint, outcomes = asyncio.run(scenario())

    assert model == "sim-model"
    assert not dead_endpoint.healthy and dead in dead_endpoint.last_error
    assert all(o.ok and o.endpoint == live.openai_base_url for o in outcomes)


def test_no_reachable_endpoint_is_an_error_naming_the_server():
    dead = f"http://127.0.0.1:{free_port()}"

    async def scenario():
        async with client_for(dead) as client:
            await client.resolve_model()

    with pytest.raises(ServerError, match=f"cannot reach the LLM server at {dead}/v1/models"):
        asyncio.run(scenario())
