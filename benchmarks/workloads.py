"""Benchmark workloads: chunks from the shipped corpus, simulator profiles, and the clients that send them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from qa_pipeline.core.chunking import chunk_document
from qa_pipeline.core.client import ClientConfig, LLMClient, install_event_loop
from qa_pipeline.core.concurrency import ConcurrencyLimit
from qa_pipeline.core.documents import discover_documents, read_document
from qa_pipeline.core.generation import ChunkTask, GenerationSettings, Generator, TelemetrySample
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.prompts import build_messages, parse_pairs, response_format

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SOURCES = REPO / "data" / "sources"

# A GPU-like capacity model: a decode step costs 5 ms plus 0.1 ms per running sequence, 64 sequences
# at most, so throughput grows ~11x from one request to a full batch and the ceiling is 5,614 output
# tokens/s. Output lengths are lognormal (mean 300, sigma 0.8: a long tail up to 1,000 tokens).
THROUGHPUT_PROFILE = {
    "max_num_seqs": 64,
    "step_base_ms": 5.0,
    "step_per_seq_ms": 0.1,
    "output_tokens_mean": 300.0,
    "output_tokens_sigma": 0.8,
    "output_tokens_min": 16,
    "output_tokens_max": 1000,
}
ZERO_LATENCY_PROFILE = {"zero_latency": True, "output_tokens_mean": 120.0, "output_tokens_max": 1000}
SETTINGS = GenerationSettings(max_tokens=1024)

logging.getLogger("aiohttp").setLevel(logging.ERROR)
# The event loop of a Dagster run of the project (its definitions install it): what the workloads measure.
install_event_loop()


def corpus_passages() -> list[tuple[str, tuple[str, ...]]]:
    """(content, heading path) of every chunk of the sample corpus shipped in data/sources."""
    passages = []
    for source in discover_documents(SAMPLE_SOURCES):
        for chunk in chunk_document(read_document(source)):
            passages.append((chunk.content, tuple(chunk.heading_path)))
    return passages


def make_tasks(count: int, document: str, offset: int = 0) -> list[ChunkTask]:
    """`count` distinct chunks: corpus passages, each with its own numbered line so every prompt
    (and so every simulated output length) differs."""
    passages = corpus_passages()
    tasks = []
    for index in range(offset, offset + count):
        content, headings = passages[index % len(passages)]
        tasks.append(ChunkTask(document, f"{document}-{index:05d}", f"{content}\n\n(Excerpt {index}.)", headings))
    return tasks


def client_config(base_url: str) -> ClientConfig:
    return ClientConfig(base_urls=[f"{base_url}/v1"], request_timeout_s=600)


@dataclass
class GeneratorRun:
    """What one Generator run achieved, seen from the client."""

    chunks: int
    valid: int
    output_tokens: int
    duration_s: float  # the work queue, first request to last answer
    wall_s: float  # the whole Generator.run: hashing, journal load, queue, journal compaction
    cpu_s: float  # this process's CPU time over wall_s
    telemetry: list[TelemetrySample]
    ended_at: float  # time.time() when the run's last answer was in

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s


def run_generator(
    base_url: str, tasks: Sequence[ChunkTask], limiter: ConcurrencyLimit, start_at: float | None = None
) -> GeneratorRun:
    """The qa_pipeline way: the real Generator (work queue, validation, journal) on a fresh data folder;
    it starts sending at `start_at` (a time.time() value) when given, once connected."""

    async def generate(layout: DataLayout) -> GeneratorRun:
        async with LLMClient(client_config(base_url)) as client:
            await client.resolve_model()
            generator = Generator(client, layout, SETTINGS, limiter, log=lambda line: None, progress_interval_s=3600)
            if start_at is not None:
                await asyncio.sleep(max(0.0, start_at - time.time()))
            cpu, wall = time.process_time(), time.monotonic()
            report = await generator.run(tasks)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            ended_at = time.time()
        # A summary, not the report: Python 3.11's asyncio.run formats its main task's result with repr()
        # when it restores the SIGINT handler, which for thousands of records costs seconds.
        return GeneratorRun(
            chunks=len(tasks),
            valid=sum(r.ok for results in report.results.values() for r in results),
            output_tokens=report.output_tokens,
            duration_s=report.duration_s,
            wall_s=wall,
            cpu_s=cpu,
            telemetry=report.telemetry,
            ended_at=ended_at,
        )

    with tempfile.TemporaryDirectory(prefix="qa-bench-") as scratch:
        return asyncio.run(generate(DataLayout(root=Path(scratch))))


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class BatchResult:
    requests: int
    valid: int
    output_tokens: int
    duration_s: float

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s


async def batch_and_wait(base_url: str, tasks: Sequence[ChunkTask], batch_size: int = 100, concurrency: int = 30) -> BatchResult:
    """The pattern of the field report: batches of 100 chunks, at most 30 requests at once, and the next
    batch only once the whole batch is back. A separate, minimal client on purpose."""
    schema = response_format()
    semaphore = asyncio.Semaphore(concurrency)
    result = BatchResult(0, 0, 0, 0.0)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(f"{base_url}/v1/models") as response:
            model = (await response.json())["data"][0]["id"]

        async def one(task: ChunkTask) -> None:
            body = {
                "model": model,
                "messages": build_messages(task.content, list(task.heading_path)),
                "max_tokens": SETTINGS.max_tokens,
                "temperature": SETTINGS.temperature,
                "response_format": schema,
            }
            async with semaphore:
                async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
                    payload = json.loads(await response.text())
            result.requests += 1
            result.output_tokens += payload["usage"]["completion_tokens"]
            choice = payload["choices"][0]
            parse_pairs(choice["message"]["content"], choice["finish_reason"])
            result.valid += 1

        started = time.monotonic()
        for start in range(0, len(tasks), batch_size):
            await asyncio.gather(*(one(task) for task in tasks[start : start + batch_size]))
        result.duration_s = time.monotonic() - started
    return result
