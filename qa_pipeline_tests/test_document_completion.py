"""A run over several documents hands each document over as soon as its last chunk is answered,
so its tables can be written while the server still works on the others."""

from __future__ import annotations

import asyncio

from qa_pipeline.core.client import ClientConfig, LLMClient
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.generation import ChunkTask, GenerationSettings, Generator
from qa_pipeline.core.layout import DataLayout


def test_each_document_is_handed_over_when_its_last_chunk_is_done_not_at_the_end_of_the_run(simulator, tmp_path):
    sim = simulator(step_base_ms=2, output_tokens_mean=40, output_tokens_max=80)
    small = [ChunkTask("small.md", f"s{i}", f"Short note {i}: the cache expires after {i} minutes.") for i in range(2)]
    large = [ChunkTask("large.md", f"l{i}", f"Long manual part {i}: restart the worker {i} times.") for i in range(60)]
    handed_over: dict[str, tuple[list[str], int]] = {}

    async def run():
        async with LLMClient(ClientConfig(base_urls=[f"{sim.base_url}/v1"])) as client:
            generator = Generator(client, DataLayout(tmp_path), GenerationSettings(), FixedLimit(2), log=lambda _: None)

            async def document_done(document, results):
                handed_over[document] = ([r.chunk_id for r in results if r.ok], sim.stats()["completed"])

            # The small document's chunks are first in the queue.
            return await generator.run(small + large, on_document_done=document_done)

    report = asyncio.run(run())
    assert handed_over["small.md"][0] == ["s0", "s1"]
    assert handed_over["small.md"][1] < 20, "the small document was handed over long before the run ended"
    assert handed_over["large.md"] == ([f"l{i}" for i in range(60)], 62)
    assert [r.chunk_id for r in report.results["large.md"]] == [f"l{i}" for i in range(60)]

    # A second run has nothing to send: every document is handed over at once, from the journal.
    handed_over.clear()
    asyncio.run(run())
    assert handed_over == {"small.md": (["s0", "s1"], 62), "large.md": ([f"l{i}" for i in range(60)], 62)}
