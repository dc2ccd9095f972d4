"""Evidence quotes are found in their chunk exactly, then ignoring case and spacing, then fuzzily; the
offsets point into the chunk as stored, and a quote the chunk does not contain is not found."""

from qa_pipeline.core.evidence import FUZZY_MIN_SCORE, locate_evidence

CHUNK = (
    "The Zen of Python\n=================\n\n"
    "Long time Pythoneer Tim Peters succinctly channels the BDFL’s guiding\n"
    "principles for Python’s design into 20 aphorisms, only 19 of which have been written down.\n\n"
    "    Beautiful is better than ugly.\n    Explicit is better than implicit.\n"
)


def test_a_verbatim_quote_is_found_exactly_at_its_offsets():
    evidence = locate_evidence(["Explicit is better than implicit."], CHUNK)
    (match,) = evidence.matches
    assert match.method == "exact" and evidence.score == 1.0 and evidence.found
    assert CHUNK[match.start : match.end] == "Explicit is better than implicit."


def test_case_spacing_and_typographic_quotes_do_not_matter_and_offsets_cover_the_original_text():
    quote = "the BDFL's guiding principles for   PYTHON's design"
    (match,) = locate_evidence([quote], CHUNK).matches
    assert match.method == "normalized" and match.score == 1.0
    assert CHUNK[match.start : match.end] == "the BDFL’s guiding\nprinciples for Python’s design"


def test_a_quote_with_a_word_dropped_is_found_fuzzily_and_its_span_is_the_passage_sentence():
    quote = "Tim Peters channels the BDFL's guiding principles for Python's design into 20 aphorisms"
    (match,) = locate_evidence([quote], CHUNK).matches
    assert match.method == "fuzzy" and FUZZY_MIN_SCORE <= match.score < 1.0
    assert CHUNK[match.start : match.end] == (
        "Tim Peters succinctly channels the BDFL’s guiding\nprinciples for Python’s design into 20 aphorisms"
    )


def test_an_invented_quote_is_not_found_and_makes_the_pair_unsupported():
    evidence = locate_evidence(
        ["Beautiful is better than ugly.", "The Easter Egg is a fictional object used to create a magical illusion."],
        CHUNK,
    )
    real, invented = evidence.matches
    assert real.found and not invented.found and invented.start is None
    assert invented.score < FUZZY_MIN_SCORE
    assert evidence.score == invented.score and evidence.not_found == 1 and not evidence.found


def test_a_pair_without_quotes_has_no_evidence():
    evidence = locate_evidence([], CHUNK)
    assert evidence.score == 0.0 and not evidence.found


def test_outputs_written_before_evidence_existed_are_rescored_and_reported_as_without_evidence(tmp_path):
    """A data folder from before this prompt: qa_pairs without evidence or difficulty columns, pair_scores
    of the previous scorer. The views still have the new columns, and the report and export work."""
    import polars as pl

    from qa_pipeline.core.export import ExportOptions, export_dataset
    from qa_pipeline.core.layout import DataLayout
    from qa_pipeline.core.quality import score_pairs
    from qa_pipeline.core.report import build_report
    from qa_pipeline.core.storage import Storage
    from qa_pipeline_tests.written_outputs import write_document

    storage = Storage(DataLayout(root=tmp_path / "data"))
    write_document(storage, "old.md", {"c1": CHUNK}, {"c1": [("Who is a Pythoneer?", "Tim Peters.", "factual")]})
    old_pairs = storage.read_partition("qa_pairs", "old.md").drop("evidence", "difficulty")
    storage.write_partition("qa_pairs", "old.md", old_pairs)
    old_scores = score_pairs(old_pairs, storage.read_partition("chunks", "old.md"))
    old_scores = old_scores.select(pl.exclude("^evidence_.*$")).with_columns(scorer_version=pl.lit("scores-v1"))
    storage.write_partition("pair_scores", "old.md", old_scores)

    report = build_report(storage).markdown()
    summary = export_dataset(storage, tmp_path / "out", ExportOptions(formats=("jsonl",), min_evidence=0.85))

    assert "difficulty labels: (none) 1" in report
    assert "pairs whose evidence is not in their chunk: 1 of 1" in report
    assert summary.dropped == {"evidence_not_in_chunk": 1}
    scores = storage.read_partition("pair_scores", "old.md")
    assert scores["evidence_score"].to_list() == [0.0] and scores["scorer_version"].to_list() == ["scores-v2"]
    assert pl.read_parquet(storage.layout.partition_file("qa_pairs", "old.md")).columns == old_pairs.columns
