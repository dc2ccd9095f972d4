"""An answer cut by max_tokens is asked again with a larger budget, within the model's context."""

from __future__ import annotations

import asyncio

from qa_pipeline.core.client import ClientConfig, LLMClient
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.generation import ChunkTask, GenerationReport, GenerationSettings, Generator
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.prompts import build_messages, response_format
from qa_pipeline.core.storage import Journal

# Every answer is 300 tokens long: more than the first budget (200), less than twice it.
LONG_ANSWERS = {"step_base_ms": 1, "output_tokens_min": 300, "output_tokens_max": 300, "output_tokens_mean": 300}
SETTINGS = GenerationSettings(max_tokens=200)


def passages(count: int) -> list[ChunkTask]:
    # Same length each: the same prompt token count for every chunk.
    return [
        ChunkTask("manual.md", f"c{i}", f"Paragraph {i}: the upload worker retries three times.") for i in range(count)
    ]


def generate(base_url: str, tmp_path, tasks: list[ChunkTask]) -> GenerationReport:
    async def main() -> GenerationReport:
        async with LLMClient(ClientConfig(base_urls=[base_url], backoff_base_s=0.05)) as llm:
            generator = Generator(llm, DataLayout(tmp_path / "data"), SETTINGS, FixedLimit(4), log=lambda _: None)
            return await generator.run(tasks)

    return asyncio.run(main())


def prompt_tokens(base_url: str) -> int:
    """The prompt tokens the server counts for a chunk of `passages`."""

    async def ask() -> int:
        async with LLMClient(ClientConfig(base_urls=[base_url])) as llm:
            await llm.resolve_model()
            task = passages(1)[0]
            outcome = await llm.chat(build_messages(task.content), response_format=response_format(), max_tokens=1)
            return outcome.prompt_tokens

    return asyncio.run(ask())


def test_a_truncated_answer_is_asked_again_with_twice_the_budget_and_the_record_shows_it(simulator, tmp_path):
    sim = simulator(**LONG_ANSWERS)
    report = generate(sim.openai_base_url, tmp_path, passages(5))

    results = report.results["manual.md"]
    assert all(r.ok and r.max_tokens_used == 400 for r in results), [(r.reason, r.max_tokens_used) for r in results]
    assert all(r.completion_tokens == 300 for r in results)
    assert sim.stats()["requests_total"] == 10, "one cut answer and one complete answer per chunk"
    # The journal keeps the budget; the cache key stays the original request's, so a re-run sends nothing.
    journal = Journal(DataLayout(tmp_path / "data").journal_file("manual.md")).load()
    assert {r.max_tokens_used for r in journal.values()} == {400}
    assert {r.request_hash for r in journal.values()} == {r.request_hash for r in results}
    generate(sim.openai_base_url, tmp_path, passages(5))
    assert sim.stats()["requests_total"] == 10


def test_the_larger_budget_stays_within_the_models_context(simulator, tmp_path):
    prompt = prompt_tokens(simulator(**LONG_ANSWERS).openai_base_url)
    # Room for the first budget (200) and for the answer (300), not for twice the budget (400).
    max_model_len = prompt + 320
    sim = simulator(**LONG_ANSWERS, max_model_len=max_model_len)
    report = generate(sim.openai_base_url, tmp_path, passages(5))

    results = report.results["manual.md"]
    assert all(r.ok and r.prompt_tokens == prompt for r in results)
    assert {r.max_tokens_used for r in results} == {max_model_len - prompt}
    stats = sim.stats()
    assert stats["requests_total"] == 10 and set(stats["by_status"]) == {"200"}, "no request beyond the context"
