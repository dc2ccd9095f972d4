"""The duplicate questions the report lists are exactly those that comparing every pair of questions finds."""

from __future__ import annotations

import random

import polars as pl
import pytest

from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.quality import NEAR_DUPLICATE_JACCARD, find_duplicates, normalized_questions
from qa_pipeline.core.report import build_report
from qa_pipeline.core.storage import Storage
from qa_pipeline_tests.written_outputs import write_document

TOPICS = [
    "the walrus operator", "f-strings", "type hints", "the GIL", "async generators", "dataclasses",
    "pattern matching", "keyword-only arguments", "the import system", "namespace packages", "decorators",
    "context managers", "the garbage collector", "positional-only parameters", "the with statement",
    "exception groups", "the zen of python", "docstring conventions", "module naming", "line length",
    "tabs and spaces", "unicode identifiers", "the print function", "integer division", "set literals",
]
TEMPLATES = [
    "What does the PEP say about {}?", "How do I use {} in Python 3?", "Why was {} added to the language?",
    "Which version introduced {}?", "What problem does {} solve?", "When should {} be avoided?",
    "How does {} interact with the standard library?", "Who proposed {} and when?",
]
EXTRA_WORDS = ["exactly", "really", "currently", "usually", "still"]


def reworded(question: str, rng: random.Random) -> str:
    """The same question with its words shuffled, one word added or one word left out."""
    words = question.rstrip("?").split()
    change = rng.choice(("shuffle", "add", "drop"))
    if change == "shuffle":
        rng.shuffle(words)
    elif change == "add":
        words.insert(rng.randrange(len(words) + 1), rng.choice(EXTRA_WORDS))
    elif len(words) > 3:
        del words[rng.randrange(len(words))]
    return " ".join(words) + "?"


def mixed_questions(documents: int, chunks: int, per_chunk: int, seed: int) -> dict[str, dict[str, list[str]]]:
    """document → chunk_id → questions: mostly different questions, with exact repeats (other case or
    spacing), rewordings of earlier questions, and the same topic asked another way, within a chunk,
    a document and across documents."""
    rng = random.Random(seed)
    asked: list[str] = []
    dataset: dict[str, dict[str, list[str]]] = {}
    for d in range(documents):
        document = dataset.setdefault(f"pep-{d:04d}.md", {})
        for c in range(chunks):
            questions = document.setdefault(f"pep-{d:04d}#{c}", [])
            for _ in range(per_chunk):
                roll = rng.random()
                if asked and roll < 0.1:
                    question = rng.choice(asked).upper() if rng.random() < 0.5 else "  " + rng.choice(asked)
                elif asked and roll < 0.25:
                    question = reworded(rng.choice(asked[-20:] if rng.random() < 0.5 else asked), rng)
                else:
                    question = rng.choice(TEMPLATES).format(rng.choice(TOPICS))
                    if rng.random() < 0.6:
                        question = question.replace("?", f" in Python 3.{rng.randrange(14)}?")
                asked.append(question)
                questions.append(question)
    return dataset


def every_pair_compared(keys: list[tuple[str, str, int]], questions: list[str]) -> list[tuple]:
    """The definition, by comparing each question with every earlier one: a question with the same
    normalised text as an earlier one repeats the first of them; otherwise it repeats the earlier
    question whose word set is most similar (Jaccard >= the threshold), the earliest of equally
    similar ones."""
    normalized = normalized_questions(pl.Series(questions))
    texts = normalized["normalized"].to_list()
    words = [frozenset(terms) for terms in normalized["terms"].to_list()]
    rows = []
    for i in range(len(questions)):
        earlier: tuple[int, float] | None = next(((j, 1.0) for j in range(i) if texts[j] == texts[i]), None)
        for j in range(i if earlier is None and words[i] else 0):
            similarity = len(words[i] & words[j]) / len(words[i] | words[j])
            if similarity >= NEAR_DUPLICATE_JACCARD and (earlier is None or similarity > earlier[1]):
                earlier = (j, similarity)
        if earlier is None:
            continue
        (document, chunk_id, index), (other_document, other_chunk, other_index) = keys[i], keys[earlier[0]]
        scope = "chunk" if (document, chunk_id) == (other_document, other_chunk) else (
            "document" if document == other_document else "dataset")
        rows.append((document, chunk_id, index, other_document, other_chunk, other_index, earlier[1], scope))
    return rows


def test_report_lists_exactly_the_duplicates_that_comparing_every_pair_of_questions_finds(tmp_path):
    storage = Storage(DataLayout(root=tmp_path / "data"))
    dataset = mixed_questions(documents=30, chunks=8, per_chunk=3, seed=15)
    for document, chunks in dataset.items():
        write_document(
            storage,
            document,
            {chunk_id: f"Text of {chunk_id}." for chunk_id in chunks},
            {chunk_id: [(q, "An answer.", "factual") for q in questions] for chunk_id, questions in chunks.items()},
        )
    # The report's order: document by document, chunks in document order, pairs in order.
    keys, questions = [], []
    for document in sorted(dataset):
        for chunk_id, chunk_questions in dataset[document].items():
            for index, question in enumerate(chunk_questions):
                keys.append((document, chunk_id, index))
                questions.append(question)
    expected = every_pair_compared(keys, questions)

    report = build_report(storage)

    listed = report.duplicates.rows()
    assert [row[:6] + row[7:] for row in listed] == [row[:6] + row[7:] for row in expected]
    assert [row[6] for row in listed] == pytest.approx([row[6] for row in expected])
    # The sample holds every kind: different questions, exact repeats, rewordings, in every scope.
    similarities = [row[6] for row in expected]
    assert 0 < len(expected) < len(questions) / 2, "most questions should be different"
    assert min(similarities) < 1.0 and similarities.count(1.0) > 20
    assert {row[7] for row in expected} == {"chunk", "document", "dataset"}
    summary = report.summary
    assert (summary["duplicates_in_chunk"], summary["duplicates_in_document"], summary["duplicates_across_documents"]) == (
        sum(row[7] == "chunk" for row in expected),
        sum(row[7] == "document" for row in expected),
        sum(row[7] == "dataset" for row in expected),
    )


def test_a_question_as_similar_to_two_earlier_ones_repeats_the_earliest():
    questions = [
        "Which release added pattern matching to python?",
        "How do I configure the scheduler?",
        "Which release added pattern matching syntax?",
        "Which release added pattern matching syntax to python?",
    ]
    found = {d.index: (d.of, round(d.similarity, 3)) for d in find_duplicates(questions)}
    # 0 and 2 share 4 of 6 words (not duplicates); 3 shares 5 of 6 with each: it names 0.
    assert found == {3: (0, 0.833)}


def test_templated_questions_repeat_only_questions_of_their_own_page():
    # Templated questions share most words: each differs from another by its page, chunk and pair.
    questions = [f"How do I configure section-{n // 50:02d}/page-{n:05d}.md#{c} ({p})?"
                 for n in range(400) for c in range(5) for p in range(3)]
    found = find_duplicates(questions)
    # Within a page the chunk and pair numbers swap places or coincide: 14 of its 15 questions repeat
    # an earlier one of that page; no page repeats another.
    assert len(found) == 400 * 14
    assert all(questions[d.of].split("#")[0] == questions[d.index].split("#")[0] for d in found)
