"""A server that dies: said once when it happens, retried within bounds, and the run fails once no endpoint
has answered for the outage timeout; one that comes back within it lets the run complete."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter

import pytest

from qa_pipeline.core.client import ClientConfig, LLMClient, ServerUnavailableError
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.generation import ChunkTask, GenerationReport, GenerationSettings, Generator
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.prompts import build_messages, response_format
from qa_pipeline.core.storage import Journal

# Slow enough (about 0.2 s per chunk) that the kill finds requests in flight and chunks still to start.
STEADY = {"max_num_seqs": 4, "step_base_ms": 5, "output_tokens_mean": 40, "output_tokens_min": 40,
          "output_tokens_max": 40}
SETTINGS = GenerationSettings(max_tokens=512)
# Short retry bounds: a request gives up within about a second of the server's death.
QUICK_RETRIES = {"max_retries": 3, "backoff_base_s": 0.1, "backoff_max_s": 0.4, "endpoint_cooldown_s": 0.2,
                 "probe_interval_max_s": 0.5, "request_timeout_s": 5.0}


def refused_url() -> str:
    """A loopback port nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def passages(count: int) -> list[ChunkTask]:
    return [
        ChunkTask("manual.md", f"c{i:04d}", f"Paragraph {i}: the upload worker writes file {i} to bucket {i % 7}.")
        for i in range(count)
    ]


def journal_of(tmp_path) -> Journal:
    return Journal(DataLayout(tmp_path / "data").journal_file("manual.md"))


async def finished_chunks(tmp_path, count: int, timeout_s: float = 30) -> None:
    path = journal_of(tmp_path).path
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and len(Journal(path).load()) >= count):
        assert time.monotonic() < deadline, f"fewer than {count} chunks finished in {timeout_s} s"
        await asyncio.sleep(0.02)


def test_a_chat_against_a_refused_port_fails_within_its_retry_bounds_as_a_connection_error():
    url = refused_url()
    config = ClientConfig(base_urls=[url], **QUICK_RETRIES)
    # Each retry waits its backoff step, or the cooldown while every endpoint is down, whichever is longer.
    bound_s = sum(
        max(min(config.backoff_max_s, config.backoff_base_s * 2**attempt), config.endpoint_cooldown_s)
        for attempt in range(config.max_retries)
    )

    async def scenario():
        async with LLMClient(config, log=lambda _: None) as client:
            client.model = "any-model"
            started = time.monotonic()
            outcome = await client.chat(build_messages("The worker retries."), response_format=response_format())
            return outcome, time.monotonic() - started

    outcome, elapsed = asyncio.run(scenario())

    assert not outcome.ok and outcome.failure_reason == "connection_error"
    assert outcome.attempts == config.max_retries + 1
    assert outcome.error == f"{url}/chat/completions: connection refused"
    assert elapsed < bound_s + 1.0, f"gave up after {elapsed:.1f} s, the retry bounds allow {bound_s:.1f} s"


def test_a_server_killed_for_good_fails_the_run_after_the_outage_timeout_naming_the_endpoint(simulator, tmp_path):
    sim = simulator(**STEADY)
    tasks = passages(200)
    lines: list[tuple[float, str]] = []
    outage_timeout_s = 4.0

    async def scenario():
        config = ClientConfig(base_urls=[sim.openai_base_url], outage_timeout_s=outage_timeout_s, **QUICK_RETRIES)
        async with LLMClient(config) as llm:
            generator = Generator(
                llm, DataLayout(tmp_path / "data"), SETTINGS, FixedLimit(8),
                log=lambda line: lines.append((time.monotonic(), line)), stall_timeout_s=600,
            )
            run = asyncio.create_task(generator.run(tasks))
            await finished_chunks(tmp_path, 20)
            await asyncio.to_thread(sim.kill)
            killed_at = time.monotonic()
            with pytest.raises(ServerUnavailableError) as raised:
                await run
            return killed_at, time.monotonic(), str(raised.value)

    killed_at, failed_at, message = asyncio.run(scenario())

    assert failed_at - killed_at < outage_timeout_s + 3, f"failed {failed_at - killed_at:.1f} s after the kill"
    assert message.startswith(f"no endpoint answered for 4 s: {sim.openai_base_url}: connection refused")
    assert "Finished chunks are saved" in message and "re-run to resume" in message
    outage_lines = [(at, line) for at, line in lines if "unreachable" in line]
    assert len(outage_lines) == 1, lines
    said_at, said = outage_lines[0]
    assert said_at - killed_at < 1.0
    # While the killed process goes away its socket resets connections; then it refuses them.
    causes = ("connection refused", "connection reset by peer")
    assert any(f"{sim.openai_base_url}: {cause}" in said for cause in causes), said
    results = journal_of(tmp_path).load().values()
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    assert 20 <= len(done) < 200
    # The requests in flight at the kill ran out of retries: recorded with the reason, for the next run to resend.
    assert failed and all(r.reason == "connection_error" and r.attempts >= 4 for r in failed)
    assert f"saved ({len(done) + len(failed)}/200, {len(failed)} of them as connection_error" in message


def test_a_server_back_within_the_outage_timeout_lets_the_run_complete(simulator, tmp_path):
    sim = simulator(**STEADY)
    tasks = passages(120)
    lines: list[str] = []

    async def scenario() -> tuple[GenerationReport, float]:
        config = ClientConfig(base_urls=[sim.openai_base_url], outage_timeout_s=60, **QUICK_RETRIES)
        async with LLMClient(config) as llm:
            generator = Generator(
                llm, DataLayout(tmp_path / "data"), SETTINGS, FixedLimit(8), log=lines.append, stall_timeout_s=600
            )
            run = asyncio.create_task(generator.run(tasks))
            await finished_chunks(tmp_path, 20)
            await asyncio.to_thread(sim.kill)
            killed_at = time.monotonic()
            # Longer than a request's retries take: the requests in flight have given up when it is back.
            await asyncio.sleep(4.0)
            await asyncio.to_thread(sim.restart)
            return await run, time.monotonic() - killed_at

    report, _ = asyncio.run(scenario())

    assert Counter("ok" if r.ok else r.reason for r in report.results["manual.md"]) == {"ok": 120}
    assert sum("unreachable" in line for line in lines) == 1
    assert sum("answers again" in line for line in lines) == 1
    assert 0 < sim.stats()["requests_total"] < 120, "the restarted server took the rest of the run"
