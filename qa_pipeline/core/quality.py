"""Heuristic quality of QA pairs: per-pair scores (groundedness, refusals, duplicates, language, lengths)
and the per-partition verdicts that the asset checks and the export apply."""

from __future__ import annotations

import math
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import polars as pl
from pydantic import BaseModel, Field

from qa_pipeline.core.evidence import FUZZY_MIN_SCORE, ChunkText, locate_evidence
from qa_pipeline.core.prompts import DEFAULT_QUESTION_TYPES
from qa_pipeline.core.layout import Table
from qa_pipeline.core.storage import PAIR_SCORES_SCHEMA, QUESTION_DUPLICATES_SCHEMA, Storage

SCORER_VERSION = "scores-v2"  # v2: evidence located in the chunk
# Word-set Jaccard at or above which two questions count as near-duplicates.
NEAR_DUPLICATE_JACCARD = 0.8

# ---------------------------------------------------------------------------------------------
# Words. Texts are tokenised, stemmed and matched with polars expressions, so scoring 100k pairs
# against their chunks takes seconds, not minutes.

STOPWORDS: dict[str, frozenset[str]] = {
    language: frozenset(words.split())
    for language, words in {
        "en": "the of and to in is that it for as with was on are be by this which or from an not have has "
        "but can a its their there what how why when where who does do than these those been were will",
        "de": "der die das und ist nicht ein eine zu den von mit sich des auf für im dem werden wird auch als "
        "oder bei nur noch wie kann sind wenn aus",
        "fr": "le la les et des est une un du pour dans que qui pas sur au avec ce sont par plus ou être "
        "aux cette ces leur peut",
        "es": "el la los las de que y en un una es por con para del se al lo como más pero sus está son "
        "este esta puede",
        "it": "il lo la le di che e è un una per non con sono del della nel gli anche come alla questo "
        "questa può",
        "nl": "de het een en van is dat niet op te zijn met voor die er aan ook als wordt bij deze kan",
        "pt": "o a os as de que e do da em um uma para com não por mais se dos das é ao está são pode",
    }.items()
}
_ALL_STOPWORDS = sorted(frozenset().union(*STOPWORDS.values()))
# Words an answer uses to talk about the text itself: neither supported nor unsupported content.
_FRAME_WORDS = sorted(
    "passage text document section chunk context excerpt according mentioned mentions mention states "
    "stated state says said described describes explains explained example also yes no".split()
)

# A word or number, with the punctuation before it when a sentence (or quote, bracket, line) starts there.
# Words join parts with ' - . (utf-8, os.path, 3.14) and thousands with a comma (1,000).
_BOUNDARY = r"""[.!?:;"'“‘(\[\n]\s*"""
_TOKEN_ONLY = r"\w+(?:['’.\-]\w+)*(?:,\d{3})*"
_TOKEN = rf"(?:{_BOUNDARY})?{_TOKEN_ONLY}"
_NUMBER = r"^\d+(?:[.,]\d+)*$"
_JOINER = r"['’.\-]"
_DIGIT_RUN = r"\d+(?:\.\d+)*"
# Crude inflection stripping, applied in order to both sides so that "uses", "used" and "use" meet.
_STEM_RULES = (
    (r"['’]s$", ""),
    (r"^(\w{2,})ies$", "${1}y"),
    (r"^(\w{2,}(?:ss|x|ch|sh))es$", "${1}"),
    (r"^(\w{2,}[^s])s$", "${1}"),
    (r"^(\w{2,})ing$", "${1}"),
    (r"^(\w{2,})ed$", "${1}"),
    (r"^(\w{2,})e$", "${1}"),
)
# Capitalised (where no sentence starts) or shaped like an identifier: snake_case, os.path, CamelCase, v2.
_IDENTIFIER = r"[_.]|\d|\p{Ll}\p{Lu}"
_REFUSAL = r"""(?ix)
    \b(?:the|this)\s+(?:text|passage|context|document|section|excerpt|chunk|article|source)s?\s+
        (?:does\s+not|doesn['’]t|do\s+not|don['’]t|did\s+not)\s+(?:\w+\s+){0,2}?
        (?:provide|mention|say|specify|state|contain|include|discuss|describe|explain|give|address|cover)
    | \bnot\s+(?:explicitly\s+|directly\s+)?(?:mentioned|specified|provided|stated|described|given|discussed|covered)
        \s+in\s+the\s+(?:text|passage|context|document|section|excerpt)
    | \bno\s+(?:information|details|mention)\s+(?:is\s+)?(?:given|provided|available|about|on|regarding)
    | \b(?:cannot|can['’]t|can\s+not)\s+be\s+(?:determined|answered|inferred)\b
    | \bI\s+(?:don['’]t|do\s+not|cannot|can['’]t)\s+(?:know|answer|find|determine)
    | \b(?:unable|not\s+possible)\s+to\s+(?:answer|determine|tell)
    | ^\s*(?:n/?a|unknown|none)\s*\.?\s*$
"""


def _stem(word: pl.Expr) -> pl.Expr:
    stem = word.str.to_lowercase()
    for pattern, replacement in _STEM_RULES:
        stem = stem.str.replace(pattern, replacement)
    return stem


def _parts(word: pl.Expr) -> pl.Expr:
    return word.str.replace_all(_JOINER, " ").str.split(" ")


def _canonical_number(number: pl.Expr) -> pl.Expr:
    """"1,000" is "1000" and "3.0" is "3", so that the same figure matches however it is written."""
    return "#" + number.str.replace_all(",", "").str.replace(r"\.0+$", "")


def _terms(lowers: pl.Series) -> pl.DataFrame:
    """lower → term, computed once per distinct word: a stem for words, "#" and the canonical figure
    for numbers (the form that is compared), and whether it is a number."""
    distinct = lowers.unique().to_frame("lower")
    number = pl.col("lower").str.contains(_NUMBER)
    return distinct.with_columns(
        number=number,
        term=pl.when(number).then(_canonical_number(pl.col("lower"))).otherwise(_stem(pl.col("lower"))),
    )


def _tokens(frame: pl.DataFrame, key: str, text: str, detailed: bool = True) -> pl.DataFrame:
    """One row per word or number of each text: key and `lower`; when detailed also the original
    `token`, its `position`, whether a `sentence_start`s there, `number` and `term` (see _terms)."""
    pattern = _TOKEN if detailed else _TOKEN_ONLY
    tokens = (
        frame.select(pl.col(key), pl.col(text).str.normalize("NFKC").str.extract_all(pattern).alias("raw"))
        .explode("raw")
        .drop_nulls("raw")
    )
    if not detailed:
        return tokens.select(key, lower=pl.col("raw").str.to_lowercase())
    tokens = tokens.with_columns(token=pl.col("raw").str.replace(f"^{_BOUNDARY}", "")).with_columns(
        position=pl.int_range(pl.len()).over(key),
        lower=pl.col("token").str.to_lowercase(),
    )
    return (
        tokens.join(_terms(tokens["lower"]), on="lower", how="left")
        .with_columns(sentence_start=(pl.col("position") == 0) | (pl.col("token") != pl.col("raw")))
        .drop("raw")
    )


def _stopword_frame() -> pl.DataFrame:
    return pl.DataFrame(
        [(language, word) for language, words in STOPWORDS.items() for word in sorted(words)],
        schema={"language": pl.String(), "lower": pl.String()},
        orient="row",
    )


def _languages(tokens: pl.DataFrame, key: str) -> pl.DataFrame:
    """key → language: the one whose common words the text uses most (at least twice, no tie), else "unknown"."""
    hits = (
        tokens.select(key, "lower")
        .join(_stopword_frame(), on="lower")
        .group_by(key, "language")
        .len()
        .sort([key, "len", "language"], descending=[False, True, False])
        .group_by(key, maintain_order=True)
        .agg(
            pl.col("language").first(),
            best=pl.col("len").first(),
            second=pl.col("len").get(1, null_on_oob=True),
        )
    )
    decided = (pl.col("best") >= 2) & (pl.col("second").is_null() | (pl.col("second") < pl.col("best")))
    return hits.select(key, language=pl.when(decided).then(pl.col("language")).otherwise(pl.lit("unknown")))


def detect_language(text: str) -> str:
    """ISO 639-1 code of the language whose common words the text uses most, or "unknown" when unclear."""
    frame = pl.DataFrame({"key": [0], "text": [text]})
    found = _languages(_tokens(frame, "key", "text"), "key")
    return found["language"][0] if found.height else "unknown"


def is_refusal(answer: str) -> bool:
    """The answer declines ("the passage does not say ...") instead of answering."""
    return bool(pl.select(pl.lit(answer).str.contains(_REFUSAL)).item())


def normalized_questions(questions: pl.Series) -> pl.DataFrame:
    """Per question: its words in lower case joined by single spaces (`normalized`), and the words that
    make it what it is (`terms`: no common words, unless nothing else is left)."""
    frame = pl.DataFrame({"row": pl.arange(0, len(questions), eager=True), "question": questions})
    tokens = _tokens(frame, "row", "question")
    grouped = tokens.group_by("row").agg(
        normalized=pl.col("lower").str.join(" "),
        content=pl.col("lower").filter(~pl.col("lower").is_in(_ALL_STOPWORDS)).unique(),
        words=pl.col("lower").unique(),
    )
    return (
        frame.select("row")
        .join(grouped, on="row", how="left", maintain_order="left")
        .select(
            pl.col("normalized").fill_null(""),
            terms=pl.when(pl.col("content").list.len() > 0).then("content").otherwise("words").fill_null([]),
        )
    )


# ---------------------------------------------------------------------------------------------
# Duplicates


@dataclass(frozen=True)
class Duplicate:
    index: int  # row of the repeating question
    of: int  # row of the earlier question it repeats
    similarity: float


# Questions the duplicate search tokenises at a time: its token tables stay this size, whatever the document's.
NORMALIZE_BATCH = 20_000


def find_duplicates(questions: Sequence[str] | pl.Series, threshold: float = NEAR_DUPLICATE_JACCARD) -> list[Duplicate]:
    """Every question that repeats an earlier one: the same normalised text or the same words (the first
    such question is named), or a word-set Jaccard similarity >= threshold (the most similar earlier
    question is named, the earliest of equally similar ones).

    Exact and fast for large datasets: see `_near_duplicates`. Memory: the questions' words are held as
    numbered terms in flat arrays (a few bytes a word), not as Python sets of strings.
    """
    series = questions if isinstance(questions, pl.Series) else pl.Series(questions, dtype=pl.String())
    found, sets = _same_words(series)
    found += [Duplicate(later, earlier, similarity) for later, earlier, similarity in _near_duplicates(sets, threshold)]
    return sorted(found, key=lambda duplicate: duplicate.index)


def _same_words(questions: pl.Series) -> tuple[list[Duplicate], _TermSets]:
    """The questions with the same normalised text or the same words as an earlier one (a duplicate of the
    first such question), and the word sets of the others that have words (for `_near_duplicates`)."""
    normalized = pl.concat(
        [
            normalized_questions(questions.slice(start, NORMALIZE_BATCH))
            for start in range(0, len(questions), NORMALIZE_BATCH)
        ]
        or [normalized_questions(questions)]
    )
    # (The first question with some words always has a text of its own: an earlier one with its text
    # would have its words.)
    first = normalized.with_columns(row=pl.int_range(pl.len(), dtype=pl.Int64)).select(
        "row",
        has_terms=pl.col("terms").list.len() > 0,
        first_text=pl.col("row").min().over("normalized"),
        first_terms=pl.col("row").min().over(pl.col("terms").list.sort().list.join("\x00")),
    )
    of = (
        pl.when(pl.col("first_text") < pl.col("row"))
        .then("first_text")
        .when(pl.col("has_terms") & (pl.col("first_terms") < pl.col("row")))
        .then("first_terms")
    )
    found = [Duplicate(i, earlier, 1.0) for i, earlier in first.select("row", of=of).drop_nulls("of").iter_rows()]
    distinct = first.filter(
        pl.col("has_terms") & (pl.col("first_text") == pl.col("row")) & (pl.col("first_terms") == pl.col("row"))
    )["row"]
    return found, _TermSets.of(distinct, normalized["terms"].gather(distinct))


def _at_least(value: float) -> int:
    """The smallest whole number >= value, forgiving the rounding error of a float product."""
    return math.ceil(value - 1e-9)


@dataclass
class _TermSets:
    """Word sets of some questions, compactly: each word numbered by how rare it is among the sets (rarest
    first, then alphabetically), each set its numbers in that order, all sets in one flat array."""

    rows: array  # the question each set belongs to, ascending
    starts: array  # set k is terms[starts[k]:starts[k + 1]]
    terms: array

    @classmethod
    def of(cls, rows: pl.Series, sets: pl.Series) -> _TermSets:
        """`sets` (lists of distinct words) of the questions `rows`."""
        words = pl.DataFrame({"k": pl.int_range(len(sets), eager=True, dtype=pl.Int64), "word": sets}).explode("word")
        words = words.drop_nulls("word")
        frequency = words.group_by("word").len()
        number = frequency.sort("len", "word").select("word", term=pl.int_range(pl.len(), dtype=pl.Int32))
        numbered = words.join(number, on="word").sort("k", "term")["term"]
        starts = pl.concat([pl.Series([0], dtype=pl.Int64), sets.list.len().cast(pl.Int64).cum_sum()])
        return cls(_array("q", rows), _array("q", starts), _array("i", numbered))

    def __len__(self) -> int:
        return len(self.rows)

    def size(self, k: int) -> int:
        return self.starts[k + 1] - self.starts[k]

    def words(self, k: int) -> array:
        return self.terms[self.starts[k] : self.starts[k + 1]]


def _array(typecode: str, values: pl.Series, batch: int = 100_000) -> array:
    """A polars column as a Python array, converted a batch at a time (no list of the whole column)."""
    out = array(typecode)
    for start in range(0, len(values), batch):
        out.extend(values.slice(start, batch).to_list())
    return out


_POSITION_BITS = 32
_POSITION_MASK = (1 << _POSITION_BITS) - 1


def _near_duplicates(sets: _TermSets, threshold: float) -> list[tuple[int, int, float]]:
    """For each set (distinct word sets) the most similar earlier one at Jaccard >= threshold, the earliest of
    equally similar ones: (later row, earlier row, similarity).

    An exact similarity join (All-Pairs with PPJoin's positional filter, Xiao et al. 2008): every
    word set is sorted rarest word first; the sets are visited from the smallest up, and each is
    compared only with the visited sets that share a word between its first |s| - ceil(t|s|) + 1
    words and their first |r| - ceil(2t/(1+t)|r|) + 1, whose size is at least t|s|, and whose shared
    words so far leave enough room. Two sets with Jaccard >= t always pass these filters, so every
    similar pair is found once, whatever the input order; and a word common to many questions (a
    section name, "configure") is in few sets' first words, so it does not make the search quadratic.
    """
    # word -> (set << _POSITION_BITS | position of the word in that set), in the order the sets were visited:
    # one int an entry instead of a tuple.
    postings: dict[int, list[int]] = defaultdict(list)
    first_large_enough: dict[int, int] = defaultdict(int)  # postings before it are too small for every later set
    best: dict[int, tuple[float, int]] = {}  # later set -> (similarity, earlier set)
    for i in sorted(range(len(sets)), key=lambda k: (sets.size(k), k)):
        words, size = sets.words(i), sets.size(i)
        smallest = _at_least(threshold * size)
        shared_so_far: dict[int, int] = {}  # set -> words shared among the prefixes, or -1 once ruled out
        for position, term in enumerate(words[: size - smallest + 1]):
            entries = postings.get(term)
            if not entries:
                continue
            start = first_large_enough[term]
            while start < len(entries) and sets.size(entries[start] >> _POSITION_BITS) < smallest:
                start += 1
            first_large_enough[term] = start
            for k in range(start, len(entries)):
                j, other_position = entries[k] >> _POSITION_BITS, entries[k] & _POSITION_MASK
                shared = shared_so_far.get(j, 0)
                if shared < 0:
                    continue
                other_size = sets.size(j)
                needed = _at_least(threshold / (1 + threshold) * (size + other_size))
                room = min(size - position, other_size - other_position)
                shared_so_far[j] = shared + 1 if shared + room >= needed else -1
        if shared_so_far:
            mine = set(words)
        for j, shared in shared_so_far.items():
            if shared < 0:
                continue
            other = sets.words(j)
            common = len(mine.intersection(other))
            similarity = common / (size + len(other) - common)
            if similarity >= threshold:
                later, earlier = max(i, j), min(i, j)
                current = best.get(later)
                if current is None or (similarity, -earlier) > (current[0], -current[1]):
                    best[later] = (similarity, earlier)
        for position, term in enumerate(words[: size - _at_least(2 * threshold / (1 + threshold) * size) + 1]):
            postings[term].append(i << _POSITION_BITS | position)
    return [(sets.rows[later], sets.rows[earlier], similarity) for later, (similarity, earlier) in best.items()]


def find_duplicate_questions(pairs: pl.DataFrame, threshold: float = NEAR_DUPLICATE_JACCARD) -> pl.DataFrame:
    """Duplicate questions among `qa_pairs` rows (earlier = earlier in the frame), with where the
    earlier one is: the same chunk, the same document, or elsewhere in the dataset."""
    found = find_duplicates(pairs["question"], threshold)
    keys = pairs.select("document", "chunk_id", "pair_index")
    later = keys.gather(pl.Series([duplicate.index for duplicate in found], dtype=pl.Int64))
    earlier = keys.gather(pl.Series([duplicate.of for duplicate in found], dtype=pl.Int64))
    same_document = pl.col("document") == pl.col("duplicate_of_document")
    scope = (
        pl.when(same_document & (pl.col("chunk_id") == pl.col("duplicate_of_chunk_id")))
        .then(pl.lit("chunk"))
        .when(same_document)
        .then(pl.lit("document"))
        .otherwise(pl.lit("dataset"))
    )
    return (
        pl.concat([later, earlier.rename(lambda name: f"duplicate_of_{name}")], how="horizontal")
        .with_columns(similarity=pl.Series([duplicate.similarity for duplicate in found], dtype=pl.Float64))
        .with_columns(scope=scope)
        .select(list(QUESTION_DUPLICATES_SCHEMA))
        .cast(QUESTION_DUPLICATES_SCHEMA)
    )


# ---------------------------------------------------------------------------------------------
# Groundedness and the scores of a partition


def _chunk_vocabulary(chunks: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(chunk_id, term) of every word, word part and figure in each chunk, and (chunk_id, chunk_language)."""
    tokens = _tokens(chunks, "chunk_id", "content", detailed=False).unique()
    distinct = tokens["lower"].unique()
    # A compound word (os.path, utf-8) also brings its parts, and digits inside words count too:
    # "PEP-3132" supports "3132".
    parts = (
        distinct.to_frame("lower")
        .with_columns(part=_parts(pl.col("lower")), figure=pl.col("lower").str.extract_all(_DIGIT_RUN))
        .with_columns(part=pl.concat_list("part", "figure"))
        .explode("part")
        .filter(pl.col("part").is_not_null() & (pl.col("part") != "") & (pl.col("part") != pl.col("lower")))
        .select("lower", "part")
    )
    part_terms = parts.join(_terms(parts["part"]).rename({"lower": "part"}), on="part").select("lower", "term")
    term_of = pl.concat([_terms(distinct).select("lower", "term"), part_terms])
    vocabulary = tokens.join(term_of, on="lower").select("chunk_id", "term").unique()
    languages = chunks.select("chunk_id").join(_languages(tokens, "chunk_id"), on="chunk_id", how="left")
    return vocabulary, languages.select("chunk_id", chunk_language=pl.col("language").fill_null("unknown"))


def evidence_columns(pairs: pl.DataFrame, chunks: pl.DataFrame) -> pl.DataFrame:
    """Per `qa_pairs` row, in order: its evidence quotes located in its chunk (see core.evidence)."""
    texts = {chunk_id: ChunkText(content) for chunk_id, content in chunks.select("chunk_id", "content").iter_rows()}
    quotes = pairs["evidence"].to_list() if "evidence" in pairs.columns else [None] * pairs.height
    rows = []
    for chunk_id, pair_quotes in zip(pairs["chunk_id"].to_list(), quotes, strict=True):
        text = texts.get(chunk_id)
        if text is None:  # an unknown chunk: nothing to look in
            rows.append(([], [], [], None, None))
            continue
        evidence = locate_evidence(pair_quotes or [], text)
        rows.append(
            (
                [m.start for m in evidence.matches],
                [m.end for m in evidence.matches],
                [m.method for m in evidence.matches],
                evidence.not_found,
                evidence.score,
            )
        )
    names = ("evidence_starts", "evidence_ends", "evidence_methods", "evidence_not_found", "evidence_score")
    return pl.DataFrame(rows, schema={name: PAIR_SCORES_SCHEMA[name] for name in names}, orient="row")


def score_pairs(
    pairs: pl.DataFrame,
    chunks: pl.DataFrame,
    threshold: float = NEAR_DUPLICATE_JACCARD,
    duplicates: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """`pair_scores` rows for `qa_pairs` rows, given the chunks they were generated from.

    groundedness: the share of the answer's content words (stop words and words about "the passage"
    left out), numbers and names that the chunk contains, after crude stemming. Numbers and names
    the chunk does not contain are listed: an invented figure or product is the typical hallucination.
    Duplicates are looked for within the frame (one document when scoring a partition); the
    dataset-wide search is `find_duplicate_questions` over all pairs. `duplicates`, when given, is that
    search done beforehand over more pairs than these (a document scored a batch at a time).
    Evidence: see `evidence_columns`.
    """
    rows = pairs.with_row_index("row")
    evidence = evidence_columns(pairs, chunks).with_row_index("row")
    vocabulary, chunk_languages = _chunk_vocabulary(chunks.select("chunk_id", "content"))
    row_chunk = rows.select("row", "chunk_id").join(chunk_languages, on="chunk_id", how="left")

    answer_tokens = _tokens(rows, "row", "answer").join(row_chunk, on="row")
    stop = _stopword_frame()
    english = stop.filter(pl.col("language") == "en")["lower"]
    content = answer_tokens.filter(
        pl.col("number")
        | (
            (pl.col("lower").str.len_chars() >= 2)
            & ~pl.col("lower").is_in(english.to_list())
            & ~pl.col("lower").is_in(_FRAME_WORDS)
        )
    ).join(stop.rename({"language": "chunk_language"}), on=["chunk_language", "lower"], how="anti")
    matched = content.join(
        vocabulary.with_columns(found=pl.lit(True)), on=["chunk_id", "term"], how="left"
    ).with_columns(pl.col("found").fill_null(False))
    # A compound word (os.path, utf-8) is supported when all its parts are.
    compound = (
        matched.filter(~pl.col("found") & ~pl.col("number") & pl.col("token").str.contains(_JOINER))
        .select("row", "position", "chunk_id", part=_parts(pl.col("lower")))
        .explode("part")
        .filter(pl.col("part") != "")
        .pipe(lambda parts: parts.join(_terms(parts["part"]).select(part="lower", term="term"), on="part"))
        .join(vocabulary.with_columns(part_found=pl.lit(True)), on=["chunk_id", "term"], how="left")
        .group_by("row", "position")
        .agg(parts_found=pl.col("part_found").fill_null(False).all())
    )
    matched = (
        matched.join(compound, on=["row", "position"], how="left")
        .with_columns(found=pl.col("found") | pl.col("parts_found").fill_null(False))
        .sort("row", "position")
    )
    name_shaped = (pl.col("token").str.contains(r"^\p{Lu}") & ~pl.col("sentence_start")) | pl.col("token").str.contains(
        _IDENTIFIER
    )
    grounded = matched.group_by("row").agg(
        content_terms=pl.len().cast(pl.Int32()),
        groundedness=pl.col("found").mean(),
        unsupported_numbers=pl.col("token").filter(pl.col("number") & ~pl.col("found")).unique(maintain_order=True),
        unsupported_names=pl.col("token")
        .filter(~pl.col("number") & ~pl.col("found") & name_shaped)
        .unique(maintain_order=True),
    )
    languages = _languages(
        _tokens(rows.select("row", text=pl.col("question") + "\n" + pl.col("answer")), "row", "text"), "row"
    )
    questions = normalized_questions(rows["question"]).select("normalized").with_columns(rows["row"])
    duplicates = (find_duplicate_questions(pairs, threshold) if duplicates is None else duplicates).select(
        "document",
        "chunk_id",
        "pair_index",
        duplicate_scope="scope",
        duplicate_of_chunk_id="duplicate_of_chunk_id",
        duplicate_of_pair_index="duplicate_of_pair_index",
        duplicate_similarity="similarity",
    )
    scored = (
        rows.join(grounded, on="row", how="left")
        .join(languages, on="row", how="left")
        .join(questions, on="row", how="left")
        .join(row_chunk.select("row", "chunk_language"), on="row", how="left")
        .join(duplicates, on=["document", "chunk_id", "pair_index"], how="left")
        .join(evidence, on="row", how="left")
        .sort("row")
        .with_columns(
            known=pl.col("chunk_id").is_in(chunks["chunk_id"].implode()),
            content_terms=pl.col("content_terms").fill_null(0),
        )
        .select(
            "document",
            "chunk_id",
            "pair_index",
            # No content words (or an unknown chunk): nothing to judge, so no score.
            groundedness=pl.when(pl.col("known") & (pl.col("content_terms") > 0)).then("groundedness"),
            content_terms=pl.when(pl.col("known")).then("content_terms"),
            unsupported_numbers=pl.when(pl.col("known")).then("unsupported_numbers").fill_null([]),
            unsupported_names=pl.when(pl.col("known")).then("unsupported_names").fill_null([]),
            refusal=pl.col("answer").str.contains(_REFUSAL),
            question_normalized="normalized",
            duplicate_scope="duplicate_scope",
            duplicate_of_chunk_id="duplicate_of_chunk_id",
            duplicate_of_pair_index="duplicate_of_pair_index",
            duplicate_similarity="duplicate_similarity",
            question_words=pl.col("question").str.count_matches(r"\S+"),
            answer_words=pl.col("answer").str.count_matches(r"\S+"),
            language=pl.col("language").fill_null("unknown"),
            chunk_language="chunk_language",
            evidence_starts="evidence_starts",
            evidence_ends="evidence_ends",
            evidence_methods="evidence_methods",
            evidence_not_found="evidence_not_found",
            evidence_score="evidence_score",
            scorer_version=pl.lit(SCORER_VERSION),
        )
    )
    return scored.cast(PAIR_SCORES_SCHEMA)  # type: ignore[arg-type]


def score_partition(storage: Storage, document: str) -> pl.DataFrame:
    """Scores one document's written `qa_pairs` against its chunks and writes its `pair_scores` partition:
    for outputs written without scores (older versions, by hand); new answers are scored as they are
    published (`Storage.publish_document`)."""
    pairs = storage.read_partition(Table.QA_PAIRS, document)
    chunks = storage.read_partition(Table.CHUNKS, document)
    if pairs is None or chunks is None:
        raise FileNotFoundError(
            f"cannot score {document!r}: its {'qa_pairs' if pairs is None else 'chunks'} partition is missing; "
            "materialize qa_pairs for this document first"
        )
    scores = score_pairs(pairs, chunks)
    storage.write_partition(Table.PAIR_SCORES, document, scores)
    return scores


def scores_are_current(scores: pl.DataFrame | None, pairs: pl.DataFrame) -> bool:
    """Whether a document's `pair_scores` exist for these pairs and were made by this scorer (then
    unchanged pairs need no rescoring)."""
    return scores is not None and scores.height == pairs.height and _made_by_this_scorer(scores)


def _made_by_this_scorer(scores: pl.DataFrame) -> bool:
    return scores["scorer_version"].unique().to_list() in ([SCORER_VERSION], [])


def refresh_pair_scores(storage: Storage) -> list[str]:
    """Scores every document whose `pair_scores` are missing, older than its `qa_pairs` (outputs
    written before scoring existed, or by hand) or made by an earlier scorer (without evidence, say),
    whether its files are its own or compacted into segments; returns the documents scored."""
    documents = storage.query("SELECT DISTINCT document FROM chunks ORDER BY 1")["document"].to_list()
    pairs_written = storage.written_times(Table.QA_PAIRS, documents)
    scores_written = storage.written_times(Table.PAIR_SCORES, documents)
    by_earlier_scorer = set(
        storage.query(
            f"SELECT DISTINCT document FROM pair_scores WHERE scorer_version IS DISTINCT FROM '{SCORER_VERSION}'"
        )["document"].to_list()
    )
    scored = []
    for document in documents:
        if document in pairs_written and (
            scores_written.get(document, -1) < pairs_written[document] or document in by_earlier_scorer
        ):
            score_partition(storage, document)
            scored.append(document)
    return scored


# ---------------------------------------------------------------------------------------------
# Verdicts per partition (what the asset checks and `export --exclude-failing-documents` apply)


class QualityThresholds(BaseModel):
    """When a partition's QA pairs are good enough to use."""

    min_success_rate: float = Field(0.95, ge=0, le=1, description="chunks with pairs / chunks")
    min_mean_groundedness: float = Field(0.7, ge=0, le=1, description="mean groundedness of the pairs")
    ungrounded_below: float = Field(0.5, ge=0, le=1, description="a pair below this groundedness is ungrounded")
    max_unsupported_share: float = Field(
        0.1, ge=0, le=1, description="share of pairs that are ungrounded, invent numbers or refuse"
    )
    max_duplicate_share: float = Field(0.1, ge=0, le=1, description="share of pairs repeating an earlier question")
    min_evidence_score: float = Field(
        FUZZY_MIN_SCORE, ge=0, le=1, description="a pair whose weakest evidence quote scores below this is unsupported"
    )
    max_unsupported_evidence_share: float = Field(
        0.1, ge=0, le=1, description="share of pairs whose evidence is not in their chunk (or who quote none)"
    )


@dataclass
class PartitionQuality:
    """The quality figures of one document's outputs."""

    document: str
    chunks: int
    chunks_with_pairs: int
    chunks_failed: int
    chunks_truncated: int
    pairs: int
    mean_groundedness: float | None
    ungrounded: int
    with_unsupported_numbers: int
    refusals: int
    unsupported: int  # pairs with any of the three problems above
    duplicates: int
    type_counts: dict[str, int] = field(default_factory=dict)
    mean_evidence_score: float | None = None
    evidence_unsupported: int = 0  # pairs whose evidence score is below the threshold, quoteless ones included
    without_evidence: int = 0  # pairs that quote nothing

    @property
    def success_rate(self) -> float | None:
        attempted = self.chunks_with_pairs + self.chunks_failed
        return self.chunks_with_pairs / attempted if attempted else None

    def share(self, count: int) -> float:
        return count / self.pairs if self.pairs else 0.0


@dataclass
class Verdict:
    """A check's outcome: whether it passed, a sentence saying why, and the figures behind it."""

    check: str
    passed: bool
    description: str
    metadata: dict[str, float | int | str | None]


def type_balance(type_counts: dict[str, int], expected: Iterable[str] = DEFAULT_QUESTION_TYPES) -> float | None:
    """Normalised entropy of the question types: 1.0 when every expected type is equally common."""
    kinds = set(expected) | set(type_counts)
    total = sum(type_counts.values())
    if total == 0 or len(kinds) < 2:
        return None
    entropy = -sum((n / total) * math.log(n / total) for n in type_counts.values() if n)
    return entropy / math.log(len(kinds))


def summarize_partition(storage: Storage, document: str, thresholds: QualityThresholds) -> PartitionQuality:
    """Quality figures of one document from its written chunks, failures and pair scores (scored now if missing)."""
    chunks = storage.read_partition(Table.CHUNKS, document)
    pairs = storage.read_partition(Table.QA_PAIRS, document)
    failures = storage.read_partition(Table.FAILURES, document)
    scores = storage.read_partition(Table.PAIR_SCORES, document)
    if pairs is not None and (scores is None or scores.height != pairs.height or "evidence_score" not in scores.columns):
        scores = score_partition(storage, document)
    return summarize(document, chunks, pairs, failures, scores, thresholds)


def summarize_documents(
    storage: Storage, documents: Sequence[str], thresholds: QualityThresholds
) -> dict[str, PartitionQuality]:
    """`summarize_partition` of many documents, each table read once through its view (not a file per
    document), so checking every document of a large dataset costs a few reads."""
    wanted = list(documents)
    tables = (Table.CHUNKS, Table.QA_PAIRS, Table.FAILURES, Table.PAIR_SCORES)
    by_table = {table: _by_document(storage.read_table(table)) for table in tables}
    quality = {}
    for document in wanted:
        chunks, pairs, failures, scores = (by_table[table].get(document) for table in tables)
        if pairs is not None and (scores is None or scores.height != pairs.height):
            scores = score_partition(storage, document)
        quality[document] = summarize(document, chunks, pairs, failures, scores, thresholds)
    return quality


def _by_document(frame: pl.DataFrame) -> dict[str, pl.DataFrame]:
    return {key[0]: part for key, part in frame.partition_by("document", as_dict=True, maintain_order=True).items()}


def summarize(
    document: str,
    chunks: pl.DataFrame | None,
    pairs: pl.DataFrame | None,
    failures: pl.DataFrame | None,
    scores: pl.DataFrame | None,
    thresholds: QualityThresholds,
) -> PartitionQuality:
    """Quality figures of one document from its tables (None: a table not written)."""
    pairs = pairs if pairs is not None else pl.DataFrame(schema={"chunk_id": pl.String(), "type": pl.String()})
    if failures is None:
        failures = pl.DataFrame(schema={"chunk_id": pl.String(), "reason": pl.String()})
    scores = scores if scores is not None else pl.DataFrame(schema=PAIR_SCORES_SCHEMA)
    with_pairs = set(pairs["chunk_id"].to_list())
    failed = failures.filter(~pl.col("chunk_id").is_in(list(with_pairs)))
    low = pl.col("groundedness").fill_null(1.0) < thresholds.ungrounded_below
    invented = pl.col("unsupported_numbers").list.len() > 0
    mean = scores["groundedness"].mean()
    evidence_mean = scores["evidence_score"].mean()
    evidence_score = pl.col("evidence_score").fill_null(0.0)
    return PartitionQuality(
        document=document,
        chunks=chunks.height if chunks is not None else len(with_pairs) + failed["chunk_id"].n_unique(),
        chunks_with_pairs=len(with_pairs),
        chunks_failed=failed["chunk_id"].n_unique(),
        chunks_truncated=failed.filter(pl.col("reason") == "truncated")["chunk_id"].n_unique(),
        pairs=pairs.height,
        mean_groundedness=float(mean) if mean is not None else None,
        ungrounded=scores.filter(low).height,
        with_unsupported_numbers=scores.filter(invented).height,
        refusals=scores.filter(pl.col("refusal")).height,
        unsupported=scores.filter(low | invented | pl.col("refusal")).height,
        duplicates=scores.filter(pl.col("duplicate_scope").is_not_null()).height,
        type_counts=dict(Counter(pairs["type"].to_list())),
        mean_evidence_score=float(evidence_mean) if evidence_mean is not None else None,
        evidence_unsupported=scores.filter(evidence_score < thresholds.min_evidence_score).height,
        without_evidence=scores.filter(pl.col("evidence_methods").list.len().fill_null(0) == 0).height,
    )


def success_rate_verdict(quality: PartitionQuality, thresholds: QualityThresholds) -> Verdict:
    rate = quality.success_rate
    passed = rate is not None and rate >= thresholds.min_success_rate
    return Verdict(
        check="success_rate",
        passed=passed,
        description=(
            f"{quality.chunks_with_pairs} of {quality.chunks_with_pairs + quality.chunks_failed} chunks of "
            f"{quality.document!r} have QA pairs ({_percent(rate)}; at least "
            f"{_percent(thresholds.min_success_rate)} needed); {quality.chunks_truncated} cut by max_tokens"
        ),
        metadata={
            "success_rate": rate,
            "min_success_rate": thresholds.min_success_rate,
            "chunks": quality.chunks,
            "chunks_failed": quality.chunks_failed,
            "chunks_truncated": quality.chunks_truncated,
            "truncation_rate": quality.chunks_truncated / quality.chunks if quality.chunks else 0.0,
        },
    )


def groundedness_verdict(quality: PartitionQuality, thresholds: QualityThresholds) -> Verdict:
    mean = quality.mean_groundedness
    unsupported_share = quality.share(quality.unsupported)
    passed = (
        quality.pairs > 0
        and mean is not None
        and mean >= thresholds.min_mean_groundedness
        and unsupported_share <= thresholds.max_unsupported_share
    )
    if quality.pairs == 0:
        description = f"{quality.document!r} has no QA pairs to check"
    else:
        description = (
            f"mean groundedness {_number(mean)} (at least {thresholds.min_mean_groundedness:g} needed); "
            f"{quality.unsupported} of {quality.pairs} pairs unsupported ({_percent(unsupported_share)}, at most "
            f"{_percent(thresholds.max_unsupported_share)}): {quality.ungrounded} below "
            f"{thresholds.ungrounded_below:g}, {quality.with_unsupported_numbers} with numbers not in the chunk, "
            f"{quality.refusals} refusals"
        )
    return Verdict(
        check="groundedness",
        passed=passed,
        description=description,
        metadata={
            "mean_groundedness": mean,
            "min_mean_groundedness": thresholds.min_mean_groundedness,
            "unsupported_share": unsupported_share,
            "max_unsupported_share": thresholds.max_unsupported_share,
            "ungrounded": quality.ungrounded,
            "with_unsupported_numbers": quality.with_unsupported_numbers,
            "refusals": quality.refusals,
            "pairs": quality.pairs,
        },
    )


def duplicates_verdict(quality: PartitionQuality, thresholds: QualityThresholds) -> Verdict:
    share = quality.share(quality.duplicates)
    return Verdict(
        check="duplicates",
        passed=share <= thresholds.max_duplicate_share,
        description=(
            f"{quality.duplicates} of {quality.pairs} questions repeat an earlier question of the same document "
            f"({_percent(share)}; at most {_percent(thresholds.max_duplicate_share)})"
        ),
        metadata={
            "duplicate_share": share,
            "max_duplicate_share": thresholds.max_duplicate_share,
            "duplicates": quality.duplicates,
            "pairs": quality.pairs,
            "type_balance": type_balance(quality.type_counts),
        },
    )


def evidence_verdict(quality: PartitionQuality, thresholds: QualityThresholds) -> Verdict:
    share = quality.share(quality.evidence_unsupported)
    passed = quality.pairs > 0 and share <= thresholds.max_unsupported_evidence_share
    if quality.pairs == 0:
        description = f"{quality.document!r} has no QA pairs to check"
    else:
        description = (
            f"{quality.evidence_unsupported} of {quality.pairs} pairs have evidence that is not in their chunk "
            f"(a quote scoring below {thresholds.min_evidence_score:g}, or no quote: {quality.without_evidence}); "
            f"{_percent(share)}, at most {_percent(thresholds.max_unsupported_evidence_share)}; "
            f"mean evidence score {_number(quality.mean_evidence_score)}"
        )
    return Verdict(
        check="evidence",
        passed=passed,
        description=description,
        metadata={
            "evidence_unsupported_share": share,
            "max_unsupported_evidence_share": thresholds.max_unsupported_evidence_share,
            "min_evidence_score": thresholds.min_evidence_score,
            "evidence_unsupported": quality.evidence_unsupported,
            "without_evidence": quality.without_evidence,
            "mean_evidence_score": quality.mean_evidence_score,
            "pairs": quality.pairs,
        },
    )


def partition_verdicts(quality: PartitionQuality, thresholds: QualityThresholds) -> list[Verdict]:
    return [
        success_rate_verdict(quality, thresholds),
        groundedness_verdict(quality, thresholds),
        evidence_verdict(quality, thresholds),
        duplicates_verdict(quality, thresholds),
    ]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
