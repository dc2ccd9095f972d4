"""Per-pair quality scores, duplicate search, partition verdicts and the quality report, on known pairs."""

from __future__ import annotations

import itertools
import random
import time

import polars as pl
import pytest

from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.quality import (
    QualityThresholds,
    detect_language,
    find_duplicate_questions,
    find_duplicates,
    groundedness_verdict,
    is_refusal,
    normalized_questions,
    duplicates_verdict,
    score_pairs,
    success_rate_verdict,
    summarize_partition,
)
from qa_pipeline.core.report import build_report
from qa_pipeline.core.storage import Storage
from qa_pipeline_tests.written_outputs import write_document

CHUNK = (
    "The scheduler assigns every chunk to a worker as soon as one is free. Workers send their requests to "
    "the vLLM server, which batches them on the GPU. Release 3.2 added continuous batching in 2023: it "
    "raised throughput by 40% on a benchmark of 1,000 requests. Configure it with os.path and PEP-3132."
)


def scores(*answers: str, chunk: str = CHUNK) -> list[dict]:
    pairs = pl.DataFrame(
        {
            "document": "doc.md",
            "chunk_id": "c1",
            "pair_index": list(range(len(answers))),
            "question": [f"Question number {i}?" for i in range(len(answers))],
            "answer": list(answers),
        },
        schema_overrides={"pair_index": pl.Int32()},
    )
    return score_pairs(pairs, pl.DataFrame({"chunk_id": ["c1"], "content": [chunk]})).to_dicts()


def test_an_answer_taken_from_its_chunk_is_fully_grounded():
    (row,) = scores("Workers send requests to the vLLM server, which batches them on the GPU.")
    assert row["groundedness"] == 1.0
    assert row["unsupported_numbers"] == [] and row["unsupported_names"] == []
    assert row["refusal"] is False


def test_inflections_thousands_separators_and_compound_names_still_count_as_grounded():
    (row,) = scores("The scheduler assigned chunks to free workers; release 3.2 batched 1000 requests with os.path.")
    assert row["groundedness"] == 1.0, row


def test_invented_numbers_and_names_are_listed_and_lower_the_score():
    grounded, invented = scores(
        "Release 3.2 raised throughput by 40%.",
        "Release 4.1 raised throughput by 75% according to Nvidia engineers in Berlin.",
    )
    assert grounded["groundedness"] == 1.0
    assert invented["unsupported_numbers"] == ["4.1", "75"]
    assert invented["unsupported_names"] == ["Nvidia", "Berlin"]
    assert invented["groundedness"] < 0.5


def test_refusal_style_answers_are_flagged_and_ordinary_answers_are_not():
    refusals = [
        "The passage does not provide information about the GPU model.",
        "The text doesn't mention which GPU is used.",
        "This is not specified in the passage.",
        "It cannot be determined from the context.",
        "I don't know.",
        "N/A",
    ]
    for answer in refusals:
        assert is_refusal(answer), answer
    assert not is_refusal("The scheduler does not wait: it assigns a chunk as soon as a worker is free.")
    assert [row["refusal"] for row in scores(*refusals[:2], "Release 3.2.")] == [True, True, False]


def test_an_answer_without_content_words_has_no_score_rather_than_a_perfect_one():
    (row,) = scores("Yes, it is.")
    assert row["groundedness"] is None and row["content_terms"] == 0


def test_language_is_told_from_common_words_and_left_unknown_when_unclear():
    assert detect_language("The scheduler assigns every chunk to a worker as soon as it is free.") == "en"
    assert detect_language("Der Scheduler weist jedem Worker einen Chunk zu, sobald er frei ist.") == "de"
    assert detect_language("Le planificateur attribue chaque morceau à un travailleur dès qu'il est libre.") == "fr"
    assert detect_language("GPU") == "unknown"


def test_repeated_and_reworded_questions_are_duplicates_of_the_first():
    questions = [
        "What does the scheduler do with each chunk?",
        "what does the Scheduler do with each chunk ?",  # same text up to case and spacing
        "With each chunk, what does the scheduler do?",  # same words, other order
        "Which server batches the requests on the GPU?",
        "How much did release 3.2 raise throughput?",
    ]
    found = {(d.index, d.of): d.similarity for d in find_duplicates(questions)}
    assert found == {(1, 0): 1.0, (2, 0): 1.0}


def test_duplicates_are_placed_in_the_chunk_the_document_or_the_dataset():
    pairs = pl.DataFrame(
        {
            "document": ["a.md", "a.md", "a.md", "b.md"],
            "chunk_id": ["a1", "a1", "a2", "b1"],
            "pair_index": [0, 1, 0, 0],
            "question": ["Which server batches requests?"] * 4,
        },
        schema_overrides={"pair_index": pl.Int32()},
    )
    duplicates = find_duplicate_questions(pairs)
    assert duplicates.select("chunk_id", "duplicate_of_chunk_id", "scope").rows() == [
        ("a1", "a1", "chunk"),
        ("a2", "a1", "document"),
        ("b1", "a1", "dataset"),
    ]


def test_near_duplicate_search_finds_exactly_what_comparing_every_pair_finds():
    rng = random.Random(7)
    vocabulary = [f"term{i}" for i in range(40)]
    questions = [" ".join(rng.sample(vocabulary, rng.randint(2, 7))) + "?" for _ in range(400)]
    questions += [q.replace("?", " term0?") for q in rng.sample(questions, 40)]
    terms = [frozenset(t) for t in normalized_questions(pl.Series(questions))["terms"].to_list()]

    def brute_force_best(i: int) -> float | None:
        best = None
        for j in range(i):
            similarity = len(terms[i] & terms[j]) / len(terms[i] | terms[j])
            if similarity >= 0.8 and (best is None or similarity > best):
                best = similarity
        return best

    expected = {i: s for i in range(len(questions)) if (s := brute_force_best(i)) is not None}
    assert expected, "the sample should contain near-duplicates"
    assert {d.index: d.similarity for d in find_duplicates(questions)} == pytest.approx(expected)


def test_duplicate_search_stays_fast_for_large_datasets():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    templates = ["What does the passage say about {}?", "How does the passage explain {}?"]
    questions = [rng.choice(templates).format(" ".join(rng.sample(words, rng.randint(1, 4)))) for _ in range(30_000)]
    started = time.process_time()
    find_duplicates(questions)
    # Comparing all pairs would be 450 million comparisons; the similarity join needs a few seconds.
    assert time.process_time() - started < 30


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(DataLayout(root=tmp_path / "data"))


def test_partition_verdicts_pass_good_outputs_and_fail_bad_ones(storage):
    good = {f"g{i}": f"Sentence {i} says the scheduler assigns chunk {i} to worker {i}." for i in range(10)}
    write_document(
        storage,
        "good.md",
        good,
        {cid: [(f"What does sentence {i} say?", text, "factual")] for i, (cid, text) in enumerate(good.items())},
    )
    write_document(
        storage,
        "bad.md",
        {"b1": CHUNK, "b2": CHUNK + " More.", "b3": CHUNK + " Even more."},
        {
            "b1": [
                ("How fast is it?", "Version 9 reached 5000 tokens per second on Nvidia H100.", "factual"),
                ("How fast is it?", "The passage does not say.", "factual"),
            ],
            "b2": [("How fast is it?", "It doubled throughput in 1999.", "conceptual")],
        },
        failures={"b3": "truncated"},
    )
    thresholds = QualityThresholds()
    good_quality = summarize_partition(storage, "good.md", thresholds)
    bad_quality = summarize_partition(storage, "bad.md", thresholds)
    assert [v.passed for v in (success_rate_verdict(good_quality, thresholds),
                               groundedness_verdict(good_quality, thresholds),
                               duplicates_verdict(good_quality, thresholds))] == [True, True, True]

    assert bad_quality.chunks_truncated == 1 and bad_quality.success_rate == pytest.approx(2 / 3)
    assert not success_rate_verdict(bad_quality, thresholds).passed
    grounded = groundedness_verdict(bad_quality, thresholds)
    assert not grounded.passed
    assert grounded.metadata["with_unsupported_numbers"] == 2 and grounded.metadata["refusals"] == 1
    duplicates = duplicates_verdict(bad_quality, thresholds)
    assert not duplicates.passed and duplicates.metadata["duplicates"] == 2
    assert "2 of 3 questions repeat" in duplicates.description


def test_quality_report_shows_scores_overall_per_document_and_as_plots(storage):
    write_document(
        storage,
        "a.md",
        {"a1": CHUNK},
        {"a1": [("Which server batches requests?", "The vLLM server batches them on the GPU.", "factual"),
                ("Why is it fast?", "It was rewritten in Rust in 2019.", "conceptual")]},
        failures={},
    )
    write_document(
        storage,
        "b.md",
        {"b1": CHUNK, "b2": CHUNK},
        {"b1": [("Which server batches requests?", "The vLLM server.", "factual")]},
        failures={"b2": "truncated"},
    )
    from qa_pipeline.core.quality import refresh_pair_scores

    assert refresh_pair_scores(storage) == ["a.md", "b.md"]
    assert refresh_pair_scores(storage) == []  # up to date now
    report = build_report(storage)
    markdown = report.markdown()
    assert "with numbers not in the chunk: 1" in markdown
    assert "0 within a document, 1 across documents" in markdown
    assert "chunks cut by max_tokens: 1" in markdown
    per_document = {row["document"]: row for row in report.per_document.to_dicts()}
    assert per_document["a.md"]["invented_numbers"] == 1 and per_document["b.md"]["chunks_truncated"] == 1
    assert report.types_per_document.columns[:3] == ["document", "conceptual", "factual"]
    assert report.worst_grounded["answer"][0] == "It was rewritten in Rust in 2019."
    for name, image in report.plots().items():
        assert image.startswith(b"\x89PNG"), name

    joined = storage.query(
        "SELECT q.answer, s.groundedness FROM qa_pairs q JOIN pair_scores s USING (document, chunk_id, pair_index) "
        "WHERE s.groundedness < 0.5"
    )
    assert joined["answer"].to_list() == ["It was rewritten in Rust in 2019."]


def test_views_exist_with_their_columns_before_anything_is_written(storage):
    for view in ("pair_scores", "question_duplicates", "judgements"):
        assert storage.query(f"SELECT * FROM {view}").height == 0
    assert "groundedness" in storage.query("SELECT * FROM pair_scores").columns


def test_scores_are_one_row_per_pair_in_pair_order():
    answers = [f"Release {i}." for i in range(25)]
    rows = scores(*answers)
    assert [row["pair_index"] for row in rows] == list(range(25))
    assert list(itertools.islice((row["answer_words"] for row in rows), 2)) == [2, 2]


def test_the_reports_throughput_counts_served_answers_from_first_request_to_last_answer(storage):
    """A batch file's answers are all stamped when the file is imported: they have no rate of their own."""
    from datetime import UTC, datetime, timedelta

    from qa_pipeline.core.prompts import QAPair
    from qa_pipeline.core.storage import ChunkResult, results_to_frames

    start = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    write_document(storage, "a.md", {"a1": CHUNK, "a2": CHUNK + " More."}, {})

    def answer(chunk_id: str, model: str, endpoint: str, answered_s: float, latency_s: float) -> ChunkResult:
        return ChunkResult(
            document="a.md", chunk_id=chunk_id, request_hash=f"{model}-{chunk_id}", ok=True, model=model,
            pairs=[QAPair(question="Which server batches requests?", answer="vLLM.", type="factual")],
            endpoint=endpoint, latency_s=latency_s, completion_tokens=100,
            finished_at=start + timedelta(seconds=answered_s),
        )

    served = [answer("a1", "served-model", "http://127.0.0.1:8000/v1", 10, 2), answer("a2", "served-model", "http://127.0.0.1:8000/v1", 12, 3)]
    batch = [answer(c, "batch-model", "batch:requests-1.jsonl", 500, 0) for c in ("a1", "a2")]
    pairs, _ = results_to_frames(served + batch)
    storage.write_partition("qa_pairs", "a.md", pairs)

    rows = build_report(storage).throughput.to_dicts()

    assert [row["model"] for row in rows] == ["served-model"]
    assert rows[0]["span_s"] == pytest.approx(4.0), "from the first request (sent at 8 s) to the last answer (12 s)"
    assert rows[0]["output_tokens_per_s"] == pytest.approx(50.0)
