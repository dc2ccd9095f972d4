"""Finds a QA pair's evidence quotes in its chunk: exactly, then ignoring case and whitespace, then fuzzily.

Offsets are character offsets into the chunk's `content` as stored, so `content[start:end]` is the
passage's own text for the quote (a user can highlight it), whichever way it was found.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

# A quote is found fuzzily when its best alignment in the chunk scores at least this (rapidfuzz's
# partial ratio / 100: 1 - the share of edited characters). A model that drops a word or changes a
# few characters of a 15-word sentence stays above it; a sentence it made up from the passage's
# words lands far below (see benchmarks/evidence_detection.py for the measured separation).
FUZZY_MIN_SCORE = 0.85
# Quotes shorter than this are too common to say anything when matched loosely: exact only.
MIN_FUZZY_QUOTE_CHARS = 12

Method = Literal["exact", "normalized", "fuzzy", "not_found"]

# Typographic variants a model writes for the passage's plain characters (and back).
_FOLD = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-", "\u00a0": " "})


@dataclass(frozen=True)
class QuoteMatch:
    """Where one quote is in the chunk (start/end None when not found) and how well it matches (0..1)."""

    quote: str
    start: int | None
    end: int | None
    score: float
    method: Method

    @property
    def found(self) -> bool:
        return self.start is not None


@dataclass(frozen=True)
class Evidence:
    """A pair's quotes located in its chunk. `score` is the weakest quote's (0 without any quote): one
    invented quote makes the pair's evidence unsupported, however good the others are."""

    matches: tuple[QuoteMatch, ...]

    @property
    def score(self) -> float:
        return min((m.score for m in self.matches), default=0.0)

    @property
    def found(self) -> bool:
        return bool(self.matches) and all(m.found for m in self.matches)

    @property
    def not_found(self) -> int:
        return sum(not m.found for m in self.matches)


def _normalized(text: str) -> tuple[str, list[int]]:
    """`text` folded for loose comparison (lower case, typographic quotes and dashes made plain, runs
    of whitespace as one space, NFKC), with the offset in `text` of each character of the result."""
    chars: list[str] = []
    offsets: list[int] = []
    in_space = True  # leading whitespace is dropped
    for index, char in enumerate(text):
        if char.isspace():
            if not in_space:
                chars.append(" ")
                offsets.append(index)
            in_space = True
            continue
        in_space = False
        for folded in unicodedata.normalize("NFKC", char).translate(_FOLD).lower():
            chars.append(folded)
            offsets.append(index)
    if chars and chars[-1] == " ":
        chars.pop()
        offsets.pop()
    return "".join(chars), offsets


def _span(offsets: list[int], start: int, end: int) -> tuple[int, int]:
    """The original [start, end) of normalized characters [start, end)."""
    return offsets[start], offsets[end - 1] + 1


# Matching runs of at least this many characters mark where an aligned quote starts and ends.
_ANCHOR_CHARS = 3


def _tightened(needle: str, text: str, start: int, end: int) -> tuple[int, int]:
    """The part of `text` a fuzzy quote stands for. The partial-ratio window is as long as the quote,
    so a quote with a word added or dropped gets a window shifted by that much; the quote is aligned
    again with a wider window, and the span runs from its first to its last matching run."""
    pad = max(_ANCHOR_CHARS, len(needle) // 4)
    low, high = max(0, start - pad), min(len(text), end + pad)
    runs = [
        op for op in Levenshtein.opcodes(needle, text[low:high])
        if op.tag == "equal" and op.dest_end - op.dest_start >= _ANCHOR_CHARS
    ]
    if not runs:
        return start, end
    first, last = runs[0], runs[-1]
    begin, finish = low + first.dest_start, low + last.dest_end
    # Ties in the alignment can leave a quote's last (or first) characters matched further away: extend
    # the span over the characters that continue the quote right there.
    source, limit = last.src_end, len(needle)
    while source < limit and finish < len(text) and needle[source] == text[finish]:
        source, finish = source + 1, finish + 1
    source = first.src_start
    while source > 0 and begin > 0 and needle[source - 1] == text[begin - 1]:
        source, begin = source - 1, begin - 1
    return begin, finish


class ChunkText:
    """One chunk's text, normalized once for locating all the quotes of its pairs."""

    def __init__(self, content: str):
        self.content = content
        self.normalized, self.offsets = _normalized(content)

    def contains(self, quote: str) -> bool:
        """Whether the text holds `quote` word for word (ignoring case, spacing and typography)."""
        return self._verbatim(quote)[0] is not None

    def _verbatim(self, quote: str) -> tuple[QuoteMatch | None, str]:
        """The quote's exact or normalized match (None if neither), and the quote normalized."""
        stripped = quote.strip().strip('"').strip()
        if not stripped:
            return None, ""
        position = self.content.find(stripped)
        if position != -1:
            return QuoteMatch(quote, position, position + len(stripped), 1.0, "exact"), stripped
        needle, _ = _normalized(stripped)
        position = self.normalized.find(needle) if needle and self.normalized else -1
        if position != -1:
            start, end = _span(self.offsets, position, position + len(needle))
            return QuoteMatch(quote, start, end, 1.0, "normalized"), needle
        return None, needle

    def locate(self, quote: str, min_fuzzy: float = FUZZY_MIN_SCORE) -> QuoteMatch:
        """Finds `quote`: exact text first, then case/whitespace/typography-insensitive, then the best
        fuzzy alignment scoring at least `min_fuzzy`. A quote not found keeps its best fuzzy score."""
        match, needle = self._verbatim(quote)
        if match is not None:
            return match
        if not needle or not self.normalized or len(needle) < MIN_FUZZY_QUOTE_CHARS:
            return QuoteMatch(quote, None, None, 0.0, "not_found")
        aligned = fuzz.partial_ratio_alignment(needle, self.normalized)
        score = aligned.score / 100 if aligned is not None else 0.0
        # A quote longer than the chunk aligns the chunk inside the quote: the chunk then supports part of it only.
        if aligned is None or len(needle) > len(self.normalized):
            return QuoteMatch(quote, None, None, score * min(1.0, len(self.normalized) / len(needle)), "not_found")
        if score < min_fuzzy or aligned.dest_end <= aligned.dest_start:
            return QuoteMatch(quote, None, None, score, "not_found")
        start, end = _span(self.offsets, *_tightened(needle, self.normalized, aligned.dest_start, aligned.dest_end))
        return QuoteMatch(quote, start, end, score, "fuzzy")


def locate_evidence(quotes: Sequence[str], chunk: str | ChunkText, min_fuzzy: float = FUZZY_MIN_SCORE) -> Evidence:
    """Every quote of one pair located in its chunk."""
    text = chunk if isinstance(chunk, ChunkText) else ChunkText(chunk)
    return Evidence(tuple(text.locate(quote, min_fuzzy) for quote in quotes))
