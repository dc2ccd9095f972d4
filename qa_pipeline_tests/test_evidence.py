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
