"""The generator keeps each chunk's request hash and journal place by its position in the document: the same
text twice costs one request, a moved chunk is answered from the journal under its new id, a forced run
asks everything again, and chunks that change between the run's two readings stop it with a clear error."""

from __future__ import annotations

import asyncio
import json

import pytest

from qa_pipeline.core.client import ClientConfig, LLMClient
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.generation import ChunkTask, GenerationSettings, Generator
from qa_pipeline.core.layout import DataLayout

DOCUMENT = "guide.md"
TEXTS = {
    "A": "The scheduler retries a failed job three times, waiting ten seconds between attempts.",
    "B": "Logs are kept for thirty days and then compressed into the archive bucket.",
    "C": "A worker that misses two heartbeats is removed from the pool and its jobs are requeued.",
}


def tasks(*layout: tuple[str, str]) -> list[ChunkTask]:
    """Chunks of DOCUMENT in order: (chunk id, which text)."""
    return [ChunkTask(DOCUMENT, chunk_id, TEXTS[text]) for chunk_id, text in layout]


def generate(sim, layout: DataLayout, chunks, force: bool = False):
    async def run():
        async with LLMClient(ClientConfig(base_urls=[f"{sim.base_url}/v1"])) as client:
            generator = Generator(client, layout, GenerationSettings(), FixedLimit(4), log=lambda _: None, force=force)
            return await generator.run(chunks)

    return asyncio.run(run())


def journal_lines(layout: DataLayout) -> list[dict]:
    return [json.loads(line) for line in layout.journal_file(DOCUMENT).read_text().splitlines()]


def test_the_same_text_twice_costs_one_request_and_each_chunk_gets_the_answer_under_its_own_id(simulator, tmp_path):
    sim, layout = simulator(step_base_ms=1), DataLayout(tmp_path)

    report = generate(sim, layout, tasks(("c0", "A"), ("c1", "B"), ("c2", "A"), ("c3", "A")))

    assert sim.stats()["completed"] == 2, "one request per distinct text"
    results = report.results[DOCUMENT]
    assert [r.chunk_id for r in results] == ["c0", "c1", "c2", "c3"]
    assert results[2].pairs == results[3].pairs == results[0].pairs
    assert results[0].request_hash == results[2].request_hash != results[1].request_hash
    # Compaction wrote one line per chunk, each under its own id, in chunk order.
    assert [line["chunk_id"] for line in journal_lines(layout)] == ["c0", "c1", "c2", "c3"]


def test_a_moved_chunk_is_answered_from_the_journal_under_its_new_id_and_only_new_text_is_sent(simulator, tmp_path):
    sim, layout = simulator(step_base_ms=1), DataLayout(tmp_path)
    first = generate(sim, layout, tasks(("x0", "A"), ("x1", "B")))
    answers = {r.request_hash: r.pairs for r in first.results[DOCUMENT]}

    # Text B moved to the front, A after it, C is new.
    report = generate(sim, layout, tasks(("y0", "B"), ("y1", "A"), ("y2", "C")))

    assert sim.stats()["completed"] == 3, "only the new text was sent"
    assert (report.cached, report.sent) == (2, 1)
    results = report.results[DOCUMENT]
    assert [r.chunk_id for r in results] == ["y0", "y1", "y2"]
    assert [r.pairs for r in results[:2]] == [answers[results[0].request_hash], answers[results[1].request_hash]]
    assert [line["chunk_id"] for line in journal_lines(layout)] == ["y0", "y1", "y2"]


def test_a_forced_run_asks_every_distinct_text_again_and_keeps_one_line_per_chunk(simulator, tmp_path):
    sim, layout = simulator(step_base_ms=1), DataLayout(tmp_path)
    chunks = tasks(("c0", "A"), ("c1", "B"), ("c2", "B"))
    generate(sim, layout, chunks)

    report = generate(sim, layout, chunks, force=True)

    assert sim.stats()["completed"] == 4, "two distinct texts, asked twice"
    assert (report.cached, report.sent) == (0, 2)
    assert [r.chunk_id for r in report.results[DOCUMENT]] == ["c0", "c1", "c2"]
    assert [line["chunk_id"] for line in journal_lines(layout)] == ["c0", "c1", "c2"]


class ChangingChunks:
    """Chunks read twice by the generator whose second reading differs: as if the chunks table was rewritten
    in between."""

    def __init__(self, first: list[ChunkTask], second: list[ChunkTask]):
        self.readings = [first, second]

    def __iter__(self):
        return iter(self.readings.pop(0) if len(self.readings) > 1 else self.readings[0])

    def __len__(self) -> int:
        return len(self.readings[0])


def test_chunks_that_change_between_the_two_readings_stop_the_run_with_an_error_naming_the_document(simulator, tmp_path):
    sim, layout = simulator(step_base_ms=1), DataLayout(tmp_path)
    changing = ChangingChunks(tasks(("c0", "A"), ("c1", "B")), tasks(("c0", "A"), ("d1", "C")))

    with pytest.raises(RuntimeError, match=f"the chunks of '{DOCUMENT}' changed while this run read them"):
        generate(sim, layout, changing)

    # What was answered is kept and a run over the current chunks sends only what is missing.
    report = generate(sim, layout, tasks(("c0", "A"), ("d1", "C")))
    assert [r.chunk_id for r in report.results[DOCUMENT]] == ["c0", "d1"]
    assert sim.stats()["completed"] <= 3
