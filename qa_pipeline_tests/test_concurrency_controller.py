"""`concurrency: auto`: the adaptive limit grows while the server has room, backs off when it is
overloaded, shares a server fairly, and never lets more requests out than the configured maximum."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from qa_pipeline.core.client import ClientConfig, LLMClient, ServerMetrics
from qa_pipeline.core.concurrency import AdaptiveLimit, ConcurrencyGate, FixedLimit
from qa_pipeline.core.generation import ChunkTask, GenerationSettings, Generator
from qa_pipeline.core.layout import DataLayout


class ModelServer:
    """A continuous-batching server in numbers only: `capacity` sequences decode together, the rest wait.

    A decode step costs 10 ms plus 0.25 ms per running sequence (the simulator's defaults), so the
    generation-token rate rises with concurrency until the batch is full.
    """

    def __init__(self, capacity: int = 64, kv_per_sequence: float = 0.0):
        self.capacity = capacity
        self.kv_per_sequence = kv_per_sequence
        self.tokens_total = 0.0
        self.elapsed_s = 0.0

    def tick(self, in_flight: float, seconds: float = 1.0) -> ServerMetrics:
        running = min(in_flight, self.capacity)
        if running:
            self.tokens_total += running / (0.010 + 0.00025 * running) * seconds
        self.elapsed_s += seconds
        return ServerMetrics(
            running=running,
            waiting=max(0.0, in_flight - self.capacity),
            kv_cache_usage=min(1.0, running * self.kv_per_sequence),
            generation_tokens_total=self.tokens_total,
            raw={"vllm:num_requests_running": running},
        )


def drive(limiter: AdaptiveLimit, server: ModelServer, steps: int) -> list[int]:
    """Runs a client that always has work (in flight = its limit) against the server; the limits over time."""
    limits = []
    for _ in range(steps):
        limiter.observe_metrics(server.tick(limiter.limit), server.elapsed_s)
        limits.append(limiter.limit)
    return limits


def metrics(running: float, waiting: float = 0.0, kv: float = 0.1, tokens: float = 0.0) -> ServerMetrics:
    return ServerMetrics(running=running, waiting=waiting, kv_cache_usage=kv, generation_tokens_total=tokens)


def test_limit_doubles_while_the_server_queue_is_empty_and_throughput_rises():
    limiter = AdaptiveLimit(initial_limit=4, max_limit=512)
    limits = drive(limiter, ModelServer(capacity=256), steps=5)
    assert limits == [4, 8, 16, 32, 64]  # the first sample, taken as the first requests land, only primes


def test_the_limit_stops_doubling_once_throughput_stops_rising():
    limiter = AdaptiveLimit(initial_limit=16)
    tokens = 0.0
    for second in range(1, 6):
        tokens += 1000.0  # the same rate whatever the limit: this run has no more work to send
        limiter.observe_metrics(metrics(running=20, tokens=tokens), float(second))
    assert [change.limit for change in limiter.changes] == [32, 33, 34, 35]


def test_limit_backs_off_when_requests_pile_up_in_the_server_queue():
    limiter = AdaptiveLimit(initial_limit=100)
    for second in range(1, 4):
        limiter.observe_metrics(metrics(running=64, waiting=36), float(second))
    assert limiter.limit == 85
    assert "36 requests waiting" in limiter.changes[-1].reason


def test_a_queue_seen_in_one_sample_only_is_not_taken_for_congestion():
    # A burst of requests that arrived between two decode steps waits until the next step.
    limiter = AdaptiveLimit(initial_limit=16)
    limiter.observe_metrics(metrics(running=16, waiting=0), 1.0)
    limiter.observe_metrics(metrics(running=16, waiting=0), 2.0)
    limiter.observe_metrics(metrics(running=28, waiting=8), 3.0)
    assert limiter.limit == 32
    limiter.observe_metrics(metrics(running=32, waiting=0), 4.0)
    assert limiter.limit == 33


def test_a_short_server_queue_is_tolerated_and_the_limit_keeps_probing():
    limiter = AdaptiveLimit(initial_limit=70)
    limiter.observe_metrics(metrics(running=64, waiting=6), 1.0)
    limiter.observe_metrics(metrics(running=64, waiting=6), 2.0)
    assert limiter.limit == 71


def test_limit_backs_off_when_the_kv_cache_is_nearly_full():
    limiter = AdaptiveLimit(initial_limit=40)
    limiter.observe_metrics(metrics(running=40, waiting=0, kv=0.97), 1.0)
    assert limiter.limit == 34
    assert "KV cache 97% full" in limiter.changes[-1].reason


def test_limit_backs_off_when_requests_fail():
    limiter = AdaptiveLimit(initial_limit=40)
    for ok in [True] * 8 + [False] * 2:
        limiter.observe_response(1.0, ok, 100)
    limiter.observe_metrics(metrics(running=40), 1.0)
    assert limiter.limit == 34
    assert "2 of 10 requests failed" in limiter.changes[-1].reason


def test_a_rare_failure_below_the_tolerance_does_not_shrink_the_limit():
    limiter = AdaptiveLimit(initial_limit=40, error_tolerance=0.05)
    for ok in [True] * 49 + [False]:
        limiter.observe_response(1.0, ok, 100)
    limiter.observe_metrics(metrics(running=40), 1.0)
    assert limiter.limit >= 40


def test_without_server_metrics_the_limit_grows_while_latency_stays_near_its_baseline():
    limiter = AdaptiveLimit(initial_limit=8)
    for second in range(1, 4):
        for _ in range(10):
            limiter.observe_response(latency_s=3.0, ok=True, output_tokens=300)  # 10 ms per token
        limiter.observe_metrics(None, float(second))
    assert limiter.limit == 64


def test_without_server_metrics_the_limit_shrinks_when_latency_per_token_climbs():
    limiter = AdaptiveLimit(initial_limit=64, latency_tolerance=2.0)
    limiter.observe_response(3.0, True, 300)
    for _ in range(5):
        limiter.observe_response(3.0, True, 300)
    limiter.observe_metrics(None, 1.0)  # baseline: 10 ms per token
    grown = limiter.limit
    for second in range(2, 6):
        for _ in range(10):
            limiter.observe_response(12.0, True, 300)  # 40 ms per token: 4x the baseline, queueing
        limiter.observe_metrics(None, float(second))
    assert limiter.limit < grown / 2
    assert "latency 4.00× baseline" in limiter.changes[-1].reason


def test_long_answers_do_not_read_as_congestion_without_metrics():
    limiter = AdaptiveLimit(initial_limit=16)
    for second in range(1, 4):
        for tokens in (50, 300, 900):  # 10 ms per token whatever the length
            limiter.observe_response(tokens * 0.010, True, tokens)
        limiter.observe_metrics(None, float(second))
    assert [change.limit for change in limiter.changes] == [32, 64, 128]


def test_limit_never_exceeds_the_configured_maximum_nor_drops_below_one():
    rng = random.Random(7)
    limiter = AdaptiveLimit(max_limit=48, initial_limit=16)
    tokens = 0.0
    for second in range(1, 2000):
        for _ in range(rng.randrange(0, 20)):
            limiter.observe_response(rng.uniform(0.1, 20), rng.random() > 0.1, rng.randrange(0, 1000))
        tokens += rng.uniform(0, 5000)
        sample = rng.choice(
            [None, metrics(rng.uniform(0, 64), rng.choice([0, 0, 3, 50]), rng.uniform(0, 1), tokens)]
        )
        limiter.observe_metrics(sample, float(second))
        assert 1 <= limiter.limit <= 48


def test_a_single_run_settles_at_a_full_batch_with_a_short_queue():
    server = ModelServer(capacity=64)
    limits = drive(AdaptiveLimit(), server, steps=120)
    settled = limits[30:]
    assert min(settled) >= 64  # the batch stays full: no throughput lost to the sawtooth
    assert max(settled) <= 64 * 1.25  # and the queue stays short


def test_two_runs_sharing_a_server_converge_to_similar_limits():
    server = ModelServer(capacity=64)
    early, late = AdaptiveLimit(), AdaptiveLimit()
    drive(early, server, steps=30)  # the first run has the server to itself for a while
    assert early.limit >= 64
    shares = []
    for _ in range(300):
        sample = server.tick(early.limit + late.limit)
        early.observe_metrics(sample, server.elapsed_s)
        late.observe_metrics(sample, server.elapsed_s)
        shares.append((early.limit, late.limit))
    first, second = zip(*shares[-60:])
    mean_first, mean_second = sum(first) / 60, sum(second) / 60
    assert abs(mean_first - mean_second) <= 0.15 * (mean_first + mean_second) / 2
    assert all(a + b >= 64 for a, b in shares[-60:])  # together they still keep the batch full


def test_the_gate_admits_no_more_than_the_limit_and_follows_its_changes():
    async def scenario() -> tuple[int, int]:
        limiter = FixedLimit(3)
        gate = ConcurrencyGate(limiter)
        release = asyncio.Event()

        async def request() -> None:
            async with gate:
                await release.wait()

        tasks = [asyncio.create_task(request()) for _ in range(10)]
        await asyncio.sleep(0.01)
        held = gate.in_flight
        limiter.limit = 5
        await gate.limit_changed()
        await asyncio.sleep(0.01)
        raised = gate.in_flight
        release.set()
        await asyncio.gather(*tasks)
        assert gate.in_flight == 0
        return held, raised

    assert asyncio.run(scenario()) == (3, 5)


@pytest.mark.parametrize("limiter", [AdaptiveLimit(max_limit=12), FixedLimit(12)], ids=["auto", "fixed"])
def test_requests_in_flight_at_the_server_never_exceed_the_configured_maximum(simulator, tmp_path, limiter):
    # A server with room for 256 sequences: only the client's limit can hold the load at 12.
    sim = simulator(max_num_seqs=256, step_base_ms=2, output_tokens_mean=60, output_tokens_max=200)
    tasks = [ChunkTask("doc", f"c{i}", f"Passage number {i} about continuous batching.") for i in range(150)]

    async def run():
        async with LLMClient(ClientConfig(base_urls=[f"{sim.base_url}/v1"])) as client:
            generator = Generator(
                client, DataLayout(tmp_path), GenerationSettings(), limiter, log=lambda _: None,
                telemetry_interval_s=0.05,
            )
            return await generator.run(tasks)

    report = asyncio.run(run())
    stats = sim.stats()
    assert stats["completed"] == 150 and report.failure_rate("doc") == 0
    assert stats["peak_running"] == 12  # the limit was reached
    assert max(sample.in_flight for sample in report.telemetry) <= 12


def test_qa_pairs_with_concurrency_auto_shows_throughput_and_server_load_in_its_metadata(simulator, data_dir):
    import dagster as dg

    from qa_pipeline.defs.assets import chunks, qa_pairs
    from qa_pipeline.defs.resources import LLMResource, StorageResource
    from qa_pipeline_tests.conftest import copy_sample

    sim = simulator(max_num_seqs=8, step_base_ms=5, output_tokens_mean=150, output_tokens_max=400)
    copy_sample(data_dir, "pep-0257.rst")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("documents", ["pep-0257.rst"])
    result = dg.materialize(
        [chunks, qa_pairs],
        partition_key="pep-0257.rst",
        instance=instance,
        resources={"llm": LLMResource(base_url=sim.base_url), "storage": StorageResource(data_dir=str(data_dir))},
        run_config={"ops": {"qa_pairs": {"config": {"adaptive_concurrency": True, "max_concurrency": 6}}}},
    )
    metadata = result.asset_materializations_for_node("qa_pairs")[0].metadata
    assert metadata["concurrency"].value == "auto"
    assert metadata["in_flight_max"].value <= 6
    assert metadata["output_tokens_per_s"].value > 0
    # The picture is a file the metadata links to, not bytes in the event log.
    plot = Path(metadata["throughput_plot"].value)
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_a_run_covering_several_documents_fails_only_the_documents_over_their_threshold(simulator, data_dir):
    """A backfill under a multi-partition policy shares one work queue; a bad document still fails alone."""
    import dagster as dg
    from qa_pipeline.defs.assets import chunks, qa_pairs
    from qa_pipeline.defs.partitions import RANGE_END_TAG as ASSET_PARTITION_RANGE_END_TAG
    from qa_pipeline.defs.partitions import RANGE_START_TAG as ASSET_PARTITION_RANGE_START_TAG
    from qa_pipeline.defs.partitions import documents
    from qa_pipeline.defs.resources import LLMResource, StorageResource
    from qa_pipeline_tests.conftest import copy_sample

    names = ["pep-0020.rst", "pep-3132.rst", "pep-0604.rst"]
    sim = simulator(
        max_num_seqs=16, step_base_ms=1, output_tokens_mean=40, output_tokens_max=100,
        fail_if_contains=["Beautiful is better than ugly"],  # every chunk of PEP 20 gets HTTP 500
    )
    copy_sample(data_dir, *names)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("documents", names)
    resources = {
        "llm": LLMResource(base_url=sim.base_url, max_retries=0),
        "storage": StorageResource(data_dir=str(data_dir)),
    }
    for name in names:
        assert dg.materialize([chunks], partition_key=name, instance=instance, resources=resources).success
    definitions = dg.Definitions(
        assets=[qa_pairs], jobs=[dg.define_asset_job("qa_pairs_backfill", selection=[qa_pairs])], resources=resources
    )
    result = definitions.resolve_job_def("qa_pairs_backfill").execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={"ops": {"qa_pairs": {"config": {"adaptive_concurrency": True}}}},
        tags={ASSET_PARTITION_RANGE_START_TAG: names[0], ASSET_PARTITION_RANGE_END_TAG: names[-1]},
    )

    assert not result.success
    status = instance.get_status_by_partition(qa_pairs.key, names, documents)
    assert status == {
        "pep-0020.rst": dg.AssetPartitionStatus.FAILED,
        "pep-3132.rst": dg.AssetPartitionStatus.MATERIALIZED,
        "pep-0604.rst": dg.AssetPartitionStatus.MATERIALIZED,
    }
    failure = next(event for event in result.all_events if event.is_step_failure and event.step_key == "qa_pairs")
    assert "1 of 3 documents failed (pep-0020.rst:" in failure.step_failure_data.user_failure_data.description
    assert sim.stats()["completed"] > 0  # the good documents went through the same queue
