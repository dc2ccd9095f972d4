"""The evidence check measured, not assumed: the simulator quotes verbatim, reworded or made-up sentences
at set rates, each quote's true kind is known, and the check's flags are compared with them."""

from __future__ import annotations

import asyncio

import polars as pl
import pytest

from qa_pipeline.core.chunking import chunk_document, chunks_to_frame
from qa_pipeline.core.client import ClientConfig, LLMClient
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.documents import discover_documents, read_document
from qa_pipeline.core.generation import ChunkTask, GenerationSettings, Generator
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.quality import QualityThresholds, score_pairs
from qa_pipeline.core.storage import results_to_frames
from qa_pipeline.simulator.content import EvidenceRates, evidence_kind
from qa_pipeline.simulator.process import start_simulator_process
from qa_pipeline_tests.conftest import SAMPLE_SOURCES

# Six question types per chunk, over the six sample documents in small chunks: over 1,000 pairs.
QUESTION_TYPES = ("factual", "conceptual", "comparison", "definition", "procedure", "consequence")


def sample_chunks() -> pl.DataFrame:
    documents = [chunk_document(read_document(source), target_tokens=100) for source in discover_documents(SAMPLE_SOURCES)]
    return chunks_to_frame([chunk for chunks in documents for chunk in chunks])


@pytest.mark.parametrize(("paraphrased", "invented"), [(0.2, 0.1), (0.3, 0.4)])
def test_the_evidence_check_finds_invented_quotes_with_precision_and_recall_of_at_least_0_99(
    tmp_path, paraphrased, invented
):
    rates = EvidenceRates(paraphrase=paraphrased, invented=invented, seed=11)
    chunks = sample_chunks()
    tasks = [ChunkTask(r["document"], r["chunk_id"], r["content"], tuple(r["heading_path"]))
             for r in chunks.iter_rows(named=True)]
    with start_simulator_process(
        zero_latency=True, evidence_paraphrase_rate=paraphrased, evidence_invented_rate=invented, evidence_seed=11
    ) as sim:
        settings = GenerationSettings(question_types=QUESTION_TYPES)

        async def generate():
            async with LLMClient(ClientConfig(base_urls=[sim.openai_base_url], model="sim-model")) as client:
                generator = Generator(client, DataLayout(root=tmp_path), settings, FixedLimit(16), log=lambda _: None)
                return await generator.run(tasks)

        report = asyncio.run(generate())
    pairs, failures = results_to_frames([r for results in report.results.values() for r in results])
    assert failures.height == 0 and pairs.height >= 1000

    # What the check flags: the pair scores the `evidence` check and `export --min-evidence` read.
    scores = score_pairs(pairs, chunks)
    flagged = (scores["evidence_score"] < QualityThresholds().min_evidence_score).to_list()
    content = dict(zip(chunks["chunk_id"], chunks["content"], strict=True))
    kinds = [
        [evidence_kind(content[chunk_id].strip(), index, quote, rates) for quote in range(len(quotes))]
        for chunk_id, index, quotes in pairs.select("chunk_id", "pair_index", "evidence").iter_rows()
    ]
    truth = ["invented" in pair_kinds for pair_kinds in kinds]
    hits = sum(f and t for f, t in zip(flagged, truth, strict=True))
    precision, recall = hits / max(1, sum(flagged)), hits / max(1, sum(truth))
    quotes = [kind for pair_kinds in kinds for kind in pair_kinds]
    print(
        f"\nevidence check, paraphrased {paraphrased:.0%} / invented {invented:.0%} of quotes: {pairs.height} pairs, "
        f"{len(quotes)} quotes ({quotes.count('verbatim')} verbatim, {quotes.count('paraphrased')} paraphrased, "
        f"{quotes.count('invented')} invented); {sum(truth)} pairs with an invented quote, {sum(flagged)} flagged: "
        f"precision {precision:.4f}, recall {recall:.4f}"
    )
    assert quotes.count("paraphrased") >= 100 and sum(truth) >= 100, "the rates give enough cases of each kind"
    assert precision >= 0.99 and recall >= 0.99
