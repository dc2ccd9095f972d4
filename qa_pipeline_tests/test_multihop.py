"""Multi-hop questions: which chunks are grouped, and what a run on the simulator (a real process on
loopback) writes, caches and records when it fails."""

from __future__ import annotations

import asyncio

import polars as pl

from qa_pipeline.core.chunking import CHUNK_SCHEMA
from qa_pipeline.core.client import ClientConfig, LLMClient
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.generation import Generator
from qa_pipeline.core.layout import DataLayout, Table
from qa_pipeline.core.multihop import MULTIHOP_TABLES, MultiHopSettings, document_hop_tasks, related_groups
from qa_pipeline.core.storage import Storage
from qa_pipeline_tests.conftest import cli_env, copy_sample, run_cli, sql
from qa_pipeline_tests.written_outputs import write_sample_chunks


def chunk_frame(rows: list[tuple[list[str], str]]) -> pl.DataFrame:
    """One document's chunks: (heading path, content) in order."""
    return pl.DataFrame(
        [
            {"document": "guide.md", "chunk_id": f"c{position}", "position": position, "heading_path": path,
             "content": content, "n_tokens": len(content.split()), "content_hash": f"h{position}", "service": None,
             "doc_type": None, "source_chunk_id": None, "metadata_json": "{}"}
            for position, (path, content) in enumerate(rows)
        ],
        schema=CHUNK_SCHEMA,
    )


def test_chunks_sharing_rare_terms_or_a_section_are_grouped_and_unrelated_or_neighbouring_ones_are_not():
    chunks = chunk_frame([
        (["Install"], "The frobnicator reads its quuxfile at start-up and caches the result."),  # c0
        (["Install"], "Run the installer from a terminal window with administrator rights."),  # c1
        (["Usage"], "Logging goes to standard error unless redirected by the shell."),  # c2
        (["Tuning"], "A quuxfile may list several frobnicator profiles, one per line."),  # c3
        (["Usage"], "Colours of the progress bar follow the terminal theme settings."),  # c4
        (["Usage"], "Plugins are reloaded whenever their folder changes on disk."),  # c5
        (["Appendix"], "Weather in the mountains changes quickly during autumn months."),  # c6
    ])

    groups = {group.chunk_ids: (group.linked_by, group.shared_terms) for group in related_groups(chunks)}

    assert groups == {
        # Two rare terms in common, across sections.
        ("c0", "c3"): ("terms", ("frobnicator", "quuxfile")),
        # The same section, two chunks apart; c4 and c5 are neighbours (they share the chunker's overlap),
        # and c5 can join neither group: it is linked to c2 but not to c4.
        ("c2", "c4"): ("heading", ()),
    }
    assert related_groups(chunks) == related_groups(chunks)  # the same requests on every run


def test_a_document_of_unrelated_chunks_gets_no_group():
    chunks = chunk_frame([
        (["A"], "Bananas ripen faster beside apples on the kitchen counter."),
        (["B"], "Glaciers carve valleys over thousands of years of slow movement."),
        (["C"], "Violins are strung with gut, steel or synthetic strings."),
        (["D"], "Comets grow tails when sunlight heats their icy nuclei."),
    ])
    assert related_groups(chunks) == []


def test_a_run_with_multihop_writes_pairs_whose_evidence_offsets_point_into_each_hop_chunk(simulator, data_dir):
    sim = simulator()
    copy_sample(data_dir, "pep-0257.rst")
    env = cli_env(data_dir, sim.base_url)
    run_cli("run", "--skip-benchmark", "--concurrency", "4", "--multihop", env=env)

    pairs = sql("SELECT * FROM multihop_pairs ORDER BY group_id", env)
    chunks = {row["chunk_id"]: row["content"] for row in sql("SELECT chunk_id, content FROM chunks", env)}
    assert pairs, "a run with --multihop writes multi-hop pairs"
    assert sql("SELECT count(*) AS n FROM qa_pairs", env)[0]["n"] > 0  # the single-chunk pairs as before
    for pair in pairs:
        hops = pair["hop_chunk_ids"]
        assert 2 <= len(hops) <= 3 and pair["group_id"] == "+".join(hops)
        assert set(pair["evidence_chunk_ids"]) == set(hops), "every hop chunk is quoted"
        for quote, chunk_id, start, end in zip(
            pair["evidence"], pair["evidence_chunk_ids"], pair["evidence_starts"], pair["evidence_ends"], strict=True
        ):
            # The quote as the chunk has it (quotation marks the model put around it are not the chunk's).
            assert chunks[chunk_id][start:end] == quote.strip().strip('"')
        assert pair["evidence_score"] == 1.0 and pair["evidence_not_found"] == 0
        assert pair["type"] == "multi_hop" and pair["prompt_version"] == "multihop-v1"


def _generate(base_url: str, storage: Storage, documents: list[str]):
    tasks, _ = document_hop_tasks(storage, documents)

    async def run():
        async with LLMClient(ClientConfig(base_urls=[f"{base_url}/v1"], max_retries=0)) as client:
            generator = Generator(client, storage.layout, MultiHopSettings(), FixedLimit(4), log=lambda line: None)
            return await generator.run(tasks)

    report = asyncio.run(run())
    return tasks, report


def test_a_second_multihop_run_answers_from_the_journal_without_a_request(simulator, tmp_path):
    sim = simulator()
    storage = Storage(DataLayout(root=tmp_path / "data"))
    write_sample_chunks(storage, "pep-0257.rst")

    tasks, first = _generate(sim.base_url, storage, ["pep-0257.rst"])
    assert tasks and first.sent == len(tasks)
    sim.reset_stats()
    _, second = _generate(sim.base_url, storage, ["pep-0257.rst"])

    assert second.sent == 0 and second.cached == len(tasks)
    assert sim.stats()["requests_by_passage"] == {}
    assert [r.pairs for r in second.results["pep-0257.rst"]] == [r.pairs for r in first.results["pep-0257.rst"]]


def test_a_group_the_server_cannot_answer_is_recorded_as_a_failure_and_the_others_are_kept(simulator, tmp_path):
    storage = Storage(DataLayout(root=tmp_path / "data"))
    write_sample_chunks(storage, "pep-0257.rst")
    tasks, _ = document_hop_tasks(storage, ["pep-0257.rst"])
    # Every prompt holding the first group's first chunk gets HTTP 500.
    poisoned = tasks[0].hops[0].content.splitlines()[0]
    sim = simulator(fail_if_contains=[poisoned])

    _, report = _generate(sim.base_url, storage, ["pep-0257.rst"])
    published = storage.publish_document("pep-0257.rst", report.results["pep-0257.rst"], MULTIHOP_TABLES)

    failures = storage.read_partition(Table.MULTIHOP_FAILURES, "pep-0257.rst")
    assert tasks[0].chunk_id in failures["chunk_id"].to_list()
    assert failures.filter(pl.col("chunk_id") == tasks[0].chunk_id)["reason"].item() == "http_error"
    assert published.pairs.height == len(tasks) - failures.height > 0
    assert tasks[0].chunk_id not in published.pairs["group_id"].to_list()
