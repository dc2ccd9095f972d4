"""The stratified test sample: every stratum present, proportional, deterministic."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest

from qa_pipeline.core.chunking import CHUNK_SCHEMA, chunk_document, chunks_to_frame
from qa_pipeline.core.documents import read_document
from qa_pipeline.core.sampling import NO_SERVICE, stratified_sample


def chunk_frame(sizes: dict[str, int], services: dict[str, str | None] | None = None) -> pl.DataFrame:
    """A chunks table with `sizes[document]` chunks per document, optionally tagged with services."""
    services = services or {}
    rows = [
        {
            "document": document,
            "chunk_id": f"{document}-{position:04d}",
            "position": position,
            "service": services.get(document),
        }
        for document, count in sizes.items()
        for position in range(count)
    ]
    schema = {"document": pl.String, "chunk_id": pl.String, "position": pl.Int64, "service": pl.String}
    return pl.DataFrame(rows, schema=schema)


def per_stratum(sample: pl.DataFrame) -> dict[str, int]:
    return dict(Counter(sample["stratum"].to_list()))


def test_every_document_is_represented_and_the_rest_follows_document_sizes():
    chunks = chunk_frame({"big.md": 1000, "medium.md": 100, "small.md": 10})

    sample = stratified_sample(chunks, size=111)

    # One each, then 108 shared by spare size (999 : 99 : 9) with largest remainders.
    assert per_stratum(sample) == {"big.md": 98, "medium.md": 11, "small.md": 2}
    assert sample.height == 111
    assert sample["chunk_id"].n_unique() == 111


def test_a_stratum_never_gives_more_chunks_than_it_has():
    sample = stratified_sample(chunk_frame({"a.md": 1, "b.md": 1, "c.md": 50}), size=30)
    assert per_stratum(sample) == {"a.md": 1, "b.md": 1, "c.md": 28}


def test_services_are_the_strata_when_chunks_have_them():
    chunks = chunk_frame(
        {"billing-1.jsonl": 30, "billing-2.jsonl": 30, "auth.jsonl": 20, "notes.md": 20},
        services={"billing-1.jsonl": "billing", "billing-2.jsonl": "billing", "auth.jsonl": "auth"},
    )

    sample = stratified_sample(chunks, size=10)

    assert set(per_stratum(sample)) == {"billing", "auth", NO_SERVICE}
    assert sum(per_stratum(sample).values()) == 10
    assert per_stratum(sample)["billing"] > per_stratum(sample)["auth"]


def test_the_same_seed_gives_the_same_sample_and_another_seed_another():
    chunks = chunk_frame({"a.md": 200, "b.md": 150, "c.md": 40})

    first = stratified_sample(chunks, size=25, seed=7)

    assert first.equals(stratified_sample(chunks, size=25, seed=7))
    assert not first.equals(stratified_sample(chunks, size=25, seed=8))


def test_row_order_of_the_input_does_not_matter():
    chunks = chunk_frame({"a.md": 200, "b.md": 150, "c.md": 40}, services={"a.md": "x"})
    shuffled = chunks.sample(fraction=1.0, shuffle=True, seed=123)
    reversed_rows = chunks.reverse()

    expected = stratified_sample(chunks, size=30, seed=3)

    assert stratified_sample(shuffled, size=30, seed=3).equals(expected)
    assert stratified_sample(reversed_rows, size=30, seed=3).equals(expected)


def test_a_size_at_or_above_the_total_returns_every_chunk_with_its_stratum():
    chunks = chunk_frame({"a.md": 3, "b.md": 2})

    sample = stratified_sample(chunks, size=100)

    assert sorted(sample["chunk_id"].to_list()) == sorted(chunks["chunk_id"].to_list())
    assert per_stratum(sample) == {"a.md": 3, "b.md": 2}


def test_fewer_places_than_strata_picks_strata_by_seed_one_chunk_each():
    chunks = chunk_frame({f"doc-{number:02d}.md": 5 for number in range(20)})

    sample = stratified_sample(chunks, size=4, seed=1)

    assert sample.height == 4
    assert set(per_stratum(sample).values()) == {1}
    assert sample.equals(stratified_sample(chunks.reverse(), size=4, seed=1))
    picks = {tuple(sorted(stratified_sample(chunks, size=4, seed=seed)["stratum"])) for seed in range(10)}
    assert len(picks) > 1  # the seed decides which strata


def test_an_empty_sample_and_empty_input_keep_the_columns():
    chunks = chunk_frame({"a.md": 5})
    assert stratified_sample(chunks, size=0).columns == [*chunks.columns, "stratum"]
    assert stratified_sample(chunks.head(0), size=10).height == 0


def test_a_negative_size_is_refused():
    with pytest.raises(ValueError, match="sample size"):
        stratified_sample(chunk_frame({"a.md": 5}), size=-1)


def test_real_chunks_from_documents_and_jsonl_are_sampled_by_service(tmp_path):
    (tmp_path / "guide.md").write_text("# Guide\n\n" + "\n\n".join(f"Paragraph {n}. " * 40 for n in range(20)))
    records = [{"content": f"Answer {n}.", "metadata": {"service": ["auth", "billing"][n % 2]}} for n in range(40)]
    (tmp_path / "faq.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    chunks = chunks_to_frame(
        chunk
        for name in ("guide.md", "faq.jsonl")
        for chunk in chunk_document(read_document(tmp_path / name), target_tokens=100)
    )
    assert chunks.schema == pl.Schema(CHUNK_SCHEMA)

    sample = stratified_sample(chunks, size=12)

    assert set(per_stratum(sample)) == {"auth", "billing", NO_SERVICE}
    assert sample.height == 12
