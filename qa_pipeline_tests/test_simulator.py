"""The vLLM simulator, run as a real process on loopback and spoken to over HTTP like a vLLM server."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import aiohttp
import pytest
from pydantic import BaseModel, Field

from qa_pipeline.core.prompts import (
    FailureReason,
    ParseError,
    build_messages,
    parse_pairs,
    response_format,
)
from qa_pipeline.simulator.config import SimulatorConfig, add_simulator_arguments, config_from_args
from qa_pipeline.simulator.process import SimulatorProcess, start_simulator_process
from qa_pipeline.simulator.server import passage_key

PASSAGE = (
    "The scheduler assigns every chunk to a worker as soon as one is free. "
    "Workers send requests to the vLLM server, which batches them on the GPU.\n\n"
    "Continuous batching lets new sequences join a running batch at every decode step. "
    "Throughput therefore grows with concurrency until the GPU is saturated."
)

# Short outputs and quick steps keep each request within tens of milliseconds.
FAST = {"output_tokens_mean": 8, "output_tokens_min": 4, "output_tokens_max": 16, "step_base_ms": 1.0}


@pytest.fixture(scope="module")
def shared_simulator() -> Iterator[SimulatorProcess]:
    """One process for the tests that need no launch options of their own: a start costs seconds
    on a busy machine."""
    with start_simulator_process(**FAST) as sim:
        yield sim


@pytest.fixture
def sim(shared_simulator: SimulatorProcess) -> SimulatorProcess:
    """The shared simulator without faults and with fresh stats."""
    shared_simulator.set_faults()
    shared_simulator.reset_stats()
    return shared_simulator


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def content(self) -> str:
        return self.json()["choices"][0]["message"]["content"]

    @property
    def finish_reason(self) -> str:
        return self.json()["choices"][0]["finish_reason"]


def chat_body(passage: str = PASSAGE, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": build_messages(passage), "response_format": response_format(), **extra}


async def _post(session: aiohttp.ClientSession, url: str, body: dict, headers: dict | None = None) -> Answer:
    async with session.post(url, json=body, headers=headers) as response:
        return Answer(response.status, dict(response.headers), await response.text())


def chat(sim: SimulatorProcess, body: dict | None = None, headers: dict | None = None, timeout_s: float = 10) -> Answer:
    async def send() -> Answer:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            return await _post(session, f"{sim.openai_base_url}/chat/completions", body or chat_body(), headers)

    return asyncio.run(send())


def chat_many(
    sim: SimulatorProcess,
    bodies: list[dict],
    concurrency: int,
    during: Callable[[SimulatorProcess], None] | None = None,
) -> tuple[list[Answer], float]:
    """Sends the bodies with at most `concurrency` in flight; returns the answers and the wall time.
    `during(sim)` is called repeatedly while requests are in flight, from a thread."""

    async def send() -> tuple[list[Answer], float]:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            gate = asyncio.Semaphore(concurrency)

            async def one(body: dict) -> Answer:
                async with gate:
                    return await _post(session, f"{sim.openai_base_url}/chat/completions", body)

            started = time.monotonic()
            work = asyncio.gather(*(one(body) for body in bodies))
            while during is not None and not work.done():
                await asyncio.to_thread(during, sim)
            answers = await work
            return answers, time.monotonic() - started

    return asyncio.run(send())


def get(url: str) -> Answer:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return Answer(response.status, dict(response.headers), response.read().decode())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), error.read().decode())


def metric(sim: SimulatorProcess, name: str, labels: str = 'model_name="sim-model"') -> float:
    for line in get(f"{sim.base_url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{labels}}} not in /metrics")


def test_models_endpoint_lists_the_served_model_names(simulator):
    sim = simulator(served_model_name=["qwen-small", "qwen-large"])

    models = get(f"{sim.openai_base_url}/models")

    assert models.status == 200
    assert [model["id"] for model in models.json()["data"]] == ["qwen-small", "qwen-large"]
    assert get(f"{sim.base_url}/health").status == 200


def test_structured_output_is_three_typed_pairs_answered_from_the_passage(sim):

    answer = chat(sim)

    assert answer.status == 200 and answer.finish_reason == "stop"
    pairs = parse_pairs(answer.content, answer.finish_reason)
    assert [pair.type for pair in pairs] == ["factual", "conceptual", "comparison"]
    assert all(pair.answer in PASSAGE for pair in pairs)
    assert all(pair.question.endswith("?") for pair in pairs)
    usage = answer.json()["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert chat(sim).content == answer.content, "the same request must get the same answer"


def test_without_response_format_the_json_comes_in_a_fenced_block_after_prose(sim):
    body = chat_body()
    del body["response_format"]

    answer = chat(sim, body)

    assert not answer.content.startswith("{") and "```json\n" in answer.content
    assert len(parse_pairs(answer.content)) == 3


class Section(BaseModel):
    heading: str = Field(max_length=20)
    level: Literal["low", "high"]
    order: int = Field(ge=10, le=20)
    weight: float = Field(gt=0, lt=1)
    reviewed: bool
    note: str | None
    subsections: list[Section]


class Outline(BaseModel):
    summary: str
    sections: list[Section] = Field(min_length=2, max_length=2)
    tags: list[Literal["draft", "final", "archived"]]
    updated: datetime


def test_any_json_schema_gets_a_conforming_instance(sim):

    answer = chat(sim, chat_body(response_format=response_format(Outline, "outline")))

    outline = Outline.model_validate_json(answer.content)
    assert [section.level for section in outline.sections] == ["low", "high"]
    assert outline.tags == ["draft", "final", "archived"]
    assert outline.summary in PASSAGE


def test_unknown_model_is_a_404_that_names_it(sim):

    answer = chat(sim, chat_body(model="gpt-x"))

    assert answer.status == 404
    error = answer.json()["error"]
    assert error == {"message": "The model `gpt-x` does not exist.", "type": "NotFoundError", "code": 404}


def test_metrics_use_vllm_names_and_show_running_and_waiting_requests_under_load(simulator):
    sim = simulator(max_num_seqs=8, output_tokens_mean=40, output_tokens_min=40, output_tokens_max=40, step_base_ms=3)
    seen: list[tuple[float, float, float]] = []

    def sample(sim: SimulatorProcess) -> None:
        seen.append(
            (
                metric(sim, "vllm:num_requests_running"),
                metric(sim, "vllm:num_requests_waiting"),
                metric(sim, "vllm:kv_cache_usage_perc"),
            )
        )
        time.sleep(0.01)

    answers, _ = chat_many(sim, [chat_body(f"Passage number {i}. {PASSAGE}") for i in range(16)], 16, sample)

    assert all(answer.status == 200 for answer in answers)
    assert max(running for running, _, _ in seen) == 8
    assert max(waiting for _, waiting, _ in seen) > 0
    assert 0 < max(kv for _, _, kv in seen) <= 1
    assert metric(sim, "vllm:generation_tokens_total") == 16 * 40
    assert metric(sim, "vllm:prompt_tokens_total") == sum(a.json()["usage"]["prompt_tokens"] for a in answers)
    assert metric(sim, "vllm:request_success_total", 'finished_reason="stop",model_name="sim-model"') == 16
    assert metric(sim, "simulator:ceiling_output_tokens_per_s") == pytest.approx(8 / (0.003 + 0.00025 * 8))


def test_throughput_at_concurrency_32_is_far_above_concurrency_1(simulator):
    fixed_length = {"output_tokens_mean": 20, "output_tokens_min": 20, "output_tokens_max": 20}
    sim = simulator(step_base_ms=5, step_per_seq_ms=0.1, **fixed_length)

    def tokens_per_s(concurrency: int, requests: int) -> float:
        bodies = [chat_body(f"Concurrency {concurrency}, passage {i}. {PASSAGE}") for i in range(requests)]
        answers, elapsed = chat_many(sim, bodies, concurrency)
        return sum(answer.json()["usage"]["completion_tokens"] for answer in answers) / elapsed

    single = tokens_per_s(1, 5)
    batched = tokens_per_s(32, 64)

    assert batched / single > 3
    assert batched < sim.stats()["ceiling_output_tokens_per_s"]


def test_small_max_tokens_cuts_the_answer_with_finish_reason_length(sim):
    full = chat(sim)

    cut = chat(sim, chat_body(max_tokens=2))

    assert cut.finish_reason == "length"
    assert cut.json()["usage"]["completion_tokens"] == 2
    assert full.content.startswith(cut.content) and len(cut.content) < len(full.content)
    with pytest.raises(ParseError) as error:
        parse_pairs(cut.content, cut.finish_reason)
    assert error.value.reason is FailureReason.TRUNCATED


def test_prompt_plus_max_tokens_beyond_max_model_len_is_a_400(sim):
    answer = chat(sim, chat_body(max_tokens=40000))

    assert answer.status == 400
    assert "maximum context length is 32768 tokens" in answer.json()["error"]["message"]


@pytest.mark.parametrize("kind", ["500", "502", "503", "429"])
def test_http_fault_kinds_answer_with_their_status(sim, kind):
    sim.set_faults(fault_rate=1.0, fault_kinds=[kind], retry_after_s=7)

    answer = chat(sim)

    assert answer.status == int(kind)
    if kind == "429":
        assert answer.headers["Retry-After"] == "7"
    if kind == "502":
        assert answer.headers["Content-Type"].startswith("text/html")
    assert sim.stats()["faults"] == {kind: 1}


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("malformed", FailureReason.INVALID_JSON),
        ("missing_field", FailureReason.MISSING_FIELD),
        ("truncate", FailureReason.TRUNCATED),
    ],
)
def test_content_fault_kinds_answer_200_with_content_the_parser_rejects(sim, kind, reason):
    sim.set_faults(fault_rate=1.0, fault_kinds=[kind])

    answer = chat(sim)

    assert answer.status == 200
    with pytest.raises(ParseError) as error:
        parse_pairs(answer.content, answer.finish_reason)
    assert error.value.reason is reason
    if kind == "missing_field":
        assert "answer" in error.value.detail
    assert sim.stats()["faults"] == {kind: 1}


def test_hang_fault_never_answers_and_the_client_times_out(sim):
    sim.set_faults(fault_rate=1.0, fault_kinds=["hang"])

    with pytest.raises(asyncio.TimeoutError):
        chat(sim, timeout_s=0.3)

    assert sim.stats()["faults"] == {"hang": 1}


def test_reset_fault_drops_the_connection_without_an_answer(sim):
    sim.set_faults(fault_rate=1.0, fault_kinds=["reset"])

    with pytest.raises(aiohttp.ServerDisconnectedError):
        chat(sim)

    stats = sim.stats()
    assert stats["faults"] == {"reset": 1} and stats["by_status"] == {}


def test_faults_drawn_with_the_same_seed_repeat_and_can_be_replaced_at_runtime(sim):

    def statuses() -> list[int]:
        sim.set_faults(fault_rate=0.5, fault_kinds=["503"], fault_seed=7)
        return [chat(sim).status for _ in range(12)]

    first = statuses()
    assert first == statuses()
    assert set(first) == {200, 503}
    sim.set_faults()
    assert chat(sim).status == 200


def test_fail_if_contains_fails_every_request_whose_prompt_has_the_text(simulator):
    sim = simulator(fail_if_contains=["- secret item"], **FAST)

    failing = chat(sim, chat_body(f"{PASSAGE}\n- secret item here"))
    passing = chat(sim)

    assert failing.status == 500 and passing.status == 200
    assert sim.stats()["faults"] == {"fail_if_contains": 1}


def test_api_key_is_required_on_v1_endpoints_only(simulator):
    sim = simulator(api_key="s3cret", **FAST)

    assert chat(sim).status == 401
    assert chat(sim, headers={"Authorization": "Bearer wrong"}).status == 401
    assert get(f"{sim.openai_base_url}/models").status == 401
    assert chat(sim, headers={"Authorization": "Bearer s3cret"}).status == 200
    assert get(f"{sim.base_url}/metrics").status == 200
    assert sim.stats()["config"]["api_key"] == "***"


def test_stats_count_requests_by_status_and_by_passage_until_reset(sim):
    other = "A different passage about caching responses by their hash."

    answers = [chat(sim), chat(sim), chat(sim, chat_body(other)), chat(sim, chat_body(model="nope"))]

    stats = sim.stats()
    assert stats["requests_total"] == 4 and stats["completed"] == 3
    assert stats["by_status"] == {"200": 3, "404": 1}
    assert stats["requests_by_passage"] == {passage_key(PASSAGE): 2, passage_key(other): 1}
    assert stats["output_tokens_total"] == sum(a.json()["usage"]["completion_tokens"] for a in answers[:3])
    sim.reset_stats()
    assert sim.stats()["requests_total"] == 0 and sim.stats()["requests_by_passage"] == {}


def test_killed_simulator_restarts_on_the_same_port(simulator):
    sim = simulator(**FAST)
    port = sim.port
    assert chat(sim).status == 200

    sim.kill()
    with pytest.raises(aiohttp.ClientConnectionError):
        chat(sim)
    sim.restart()

    assert sim.port == port
    assert chat(sim).status == 200
    assert sim.stats()["requests_total"] == 1


def test_zero_latency_mode_answers_at_once_and_reports_no_ceiling(simulator):
    sim = simulator(zero_latency=True)

    answers, _ = chat_many(sim, [chat_body(f"Passage {i}. {PASSAGE}") for i in range(200)], 50)

    assert all(answer.status == 200 for answer in answers)
    assert sim.stats()["ceiling_output_tokens_per_s"] is None
    assert metric(sim, "simulator:ceiling_output_tokens_per_s") == float("inf")


def test_cli_options_build_the_config_and_unset_ones_keep_its_defaults():
    parser = argparse.ArgumentParser()
    add_simulator_arguments(parser)

    args = parser.parse_args(
        [
            "--max-num-seqs", "8",
            "--fault-kinds", "500,hang",
            "--fault-rate", "0.2",
            "--fail-if-contains=-x",
            "--served-model-name", "a", "b",
            "--zero-latency",
        ]
    )  # fmt: skip

    config = config_from_args(args)
    assert config == SimulatorConfig(
        max_num_seqs=8,
        fault_kinds=["500", "hang"],
        fault_rate=0.2,
        fail_if_contains=["-x"],
        served_model_name=["a", "b"],
        zero_latency=True,
    )
    assert config_from_args(parser.parse_args([])) == SimulatorConfig()
    assert SimulatorConfig().ceiling_output_tokens_per_s == pytest.approx(64 / 0.026)
    with pytest.raises(SystemExit):
        parser.parse_args(["--fault-kinds", "500,explode"])
