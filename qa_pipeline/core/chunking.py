"""Split a document into chunks of about a target token count that follow its headings, code and tables."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from qa_pipeline.core.documents import (
    Document,
    DocumentError,
    DocumentFormat,
    PrechunkedRecord,
    SourceFile,
    read_document,
)
from qa_pipeline.core.parsers.blocks import CODE, TABLE, TEXT, Block
from qa_pipeline.core.parsers.markdown import parse_markdown
from qa_pipeline.core.parsers.rst import parse_rst
from qa_pipeline.core.parsers.text import parse_text

DEFAULT_TARGET_TOKENS = 400
DEFAULT_OVERLAP_TOKENS = 50

# --- token counting -------------------------------------------------------------------

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
# One token per CJK character, per run of up to four other word characters (so a word
# of n letters counts ceil(n / 4)), and per punctuation mark or run of up to eight of
# the same mark (BPE vocabularies hold rulers such as "--------").
_TOKEN = re.compile(rf"[^\W{_CJK}]{{1,4}}|([^\w\s])\1{{0,7}}|[{_CJK}]")


def count_tokens(text: str) -> int:
    """A fast estimate of a BPE tokenizer's count (cl100k-like), erring slightly high.

    Each punctuation mark (or run of up to eight equal marks) and each CJK character
    counts one token, every other word one token per four characters (rounded up).
    English prose comes out somewhat above real BPE counts, code and identifiers close
    to them: safe for context limits. One regex pass, linear in the text. Counts add up
    over whitespace-separated parts, which the chunker relies on.
    """
    return len(_TOKEN.findall(text))


# --- records --------------------------------------------------------------------------


class Chunk(BaseModel):
    """One passage of a document, the unit a QA pair is generated from."""

    model_config = ConfigDict(frozen=True)

    document: str
    chunk_id: str
    position: int
    heading_path: list[str]
    content: str
    n_tokens: int
    content_hash: str
    service: str | None = None
    doc_type: str | None = None
    source_chunk_id: str | None = None
    metadata_json: str = "{}"

    def to_record(self) -> dict[str, Any]:
        return self.model_dump()


CHUNK_SCHEMA: dict[str, pl.DataType] = {
    "document": pl.String(),
    "chunk_id": pl.String(),
    "position": pl.Int64(),
    "heading_path": pl.List(pl.String()),
    "content": pl.String(),
    "n_tokens": pl.Int64(),
    "content_hash": pl.String(),
    "service": pl.String(),
    "doc_type": pl.String(),
    "source_chunk_id": pl.String(),
    "metadata_json": pl.String(),
}


def chunks_to_frame(chunks: Iterable[Chunk]) -> pl.DataFrame:
    """Chunks as a DataFrame with exactly CHUNK_SCHEMA (also when there are none)."""
    columns: dict[str, list[Any]] = {name: [] for name in CHUNK_SCHEMA}
    for chunk in chunks:
        for name in CHUNK_SCHEMA:
            columns[name].append(getattr(chunk, name))
    return pl.DataFrame(columns, schema=CHUNK_SCHEMA)


def chunk_frames(chunks: Iterable[Chunk], rows: int = 2000) -> Iterator[pl.DataFrame]:
    """Chunks as frames of at most `rows` rows (see `chunks_to_frame`), made as the chunks come."""
    iterator = iter(chunks)
    while batch := list(itertools.islice(iterator, rows)):
        yield chunks_to_frame(batch)


def content_hash(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def chunk_id(document: str, position: int, content_digest: str) -> str:
    """Stable id: the same document, position and content always give the same id."""
    return hashlib.sha256(f"{document}\0{position}\0{content_digest}".encode()).hexdigest()[:16]


# --- entry point ----------------------------------------------------------------------


def chunk_document(
    document: Document,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
    max_tokens: int | None = None,
) -> list[Chunk]:
    """Chunks of `document` in reading order (see `iter_chunks`)."""
    return list(iter_chunks(document, target_tokens, overlap_tokens, max_tokens))


def iter_chunks(
    document: Document,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
    max_tokens: int | None = None,
) -> Iterator[Chunk]:
    """Chunks of `document` in reading order, made as they are asked for: a large document's chunks are
    never all in memory at once (its text is).

    A chunk never spans two sections (its `heading_path` is exact, which the prompt
    and the report rely on), so a short section gives a short chunk. Pre-chunked
    JSONL records become one chunk each, unchanged, whatever their size.
    """
    max_tokens = 2 * target_tokens if max_tokens is None else max_tokens
    if target_tokens < 1 or max_tokens < target_tokens or not 0 <= overlap_tokens < target_tokens:
        raise ValueError(
            f"need 1 <= target_tokens <= max_tokens and 0 <= overlap_tokens < target_tokens; got "
            f"target_tokens={target_tokens}, overlap_tokens={overlap_tokens}, max_tokens={max_tokens}"
        )
    if document.format is DocumentFormat.JSONL:
        for position, record in enumerate(document.records):
            yield _record_chunk(document.key, position, record)
        return
    parse = _PARSERS[document.format]
    packer = _Packer(target_tokens, max_tokens, overlap_tokens)
    position = 0
    for heading_path, blocks in _sections(parse(document.text)):
        for content, n_tokens in packer.pack(blocks):
            digest = content_hash(content)
            yield Chunk(
                document=document.key,
                chunk_id=chunk_id(document.key, position, digest),
                position=position,
                heading_path=list(heading_path),
                content=content,
                n_tokens=n_tokens,
                content_hash=digest,
            )
            position += 1


def _record_chunk(document: str, position: int, record: PrechunkedRecord) -> Chunk:
    metadata = record.metadata
    digest = content_hash(record.content)
    original_id = metadata.get("chunk_id")
    return Chunk(
        document=document,
        chunk_id=chunk_id(document, position, digest),
        position=position,
        heading_path=_heading_list(metadata.get("heading_hierarchy", metadata.get("heading_path"))),
        content=record.content,
        n_tokens=count_tokens(record.content),
        content_hash=digest,
        service=_scalar_text(metadata.get("service")),
        doc_type=_scalar_text(metadata.get("doc_type")),
        source_chunk_id=_scalar_text(original_id),
        metadata_json=json.dumps(metadata, ensure_ascii=False, sort_keys=True, default=str),
    )


def _scalar_text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text or None


def _heading_list(value: Any) -> list[str]:
    """A heading hierarchy given as a list, or as one string like "Guide > Install"."""
    if isinstance(value, list):
        items = [_scalar_text(item) for item in value]
        return [item for item in items if item]
    text = _scalar_text(value)
    if not text:
        return []
    return [part.strip() for part in text.split(">") if part.strip()]


def _sections(blocks: Iterable[Block]) -> Iterator[tuple[tuple[str, ...], Iterator[Block]]]:
    """Runs of blocks under the same heading path, each read as it is packed."""
    for heading_path, section in itertools.groupby(blocks, key=lambda block: block.heading_path):
        yield heading_path, section


_PARSERS: dict[DocumentFormat, Callable[[str], Iterable[Block]]] = {
    DocumentFormat.MARKDOWN: parse_markdown,
    DocumentFormat.HTML: parse_markdown,  # read_document converts HTML to Markdown
    DocumentFormat.RST: parse_rst,
    DocumentFormat.TEXT: parse_text,
}


# --- splitting and packing ------------------------------------------------------------


@dataclass(slots=True)
class _Piece:
    """A part of one block small enough for any chunk; `glue` is the whitespace that preceded it."""

    text: str
    tokens: int
    block: int
    glue: str = ""
    overlap: bool = False


_Splitter = Callable[[str], list[tuple[str, str]]]


def _separator_splitter(pattern: str) -> _Splitter:
    """Split at whitespace separators, keeping each separator as the glue of the part after it."""
    separator = re.compile(pattern)

    def split(text: str) -> list[tuple[str, str]]:
        parts: list[tuple[str, str]] = []
        position = 0
        glue = ""
        for match in separator.finditer(text):
            if match.start() > position:
                parts.append((text[position : match.start()], glue))
                glue = match.group()
            else:
                glue += match.group()
            position = match.end()
        if position < len(text):
            parts.append((text[position:], glue))
        return parts

    return split


_PARAGRAPHS = _separator_splitter(r"\n[ \t]*\n\s*")
_SENTENCES = _separator_splitter(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")
_LINES = _separator_splitter(r"\n")
_GRID_ROWS = _separator_splitter(r"(?<=\+)[ \t]*\n")
_WORDS = _separator_splitter(r"\s+")
_SPLITTERS: dict[str, tuple[_Splitter, ...]] = {
    TEXT: (_PARAGRAPHS, _SENTENCES, _LINES, _WORDS),
    CODE: (_LINES, _WORDS),
    TABLE: (_GRID_ROWS, _LINES, _WORDS),
}


# Text longer than this many characters per token of budget is split without counting
# it first: it almost surely does not fit, and counting a huge block twice costs time.
_CHARS_WORTH_COUNTING = 16


def _split(text: str, budget: int, splitters: Sequence[_Splitter], glue: str = "") -> list[tuple[str, int, str]]:
    """(part, tokens, glue) triples of at most `budget` tokens, cut at the coarsest boundary that works."""
    if len(text) <= budget * _CHARS_WORTH_COUNTING or not splitters:
        tokens = count_tokens(text)
        if tokens <= budget:
            return [(text, tokens, glue)]
    for depth, splitter in enumerate(splitters):
        parts = splitter(text)
        if len(parts) > 1:
            result: list[tuple[str, int, str]] = []
            for number, (part, part_glue) in enumerate(parts):
                result.extend(_split(part, budget, splitters[depth + 1 :], part_glue if number else glue))
            return result
    # One unbroken run longer than the budget (a minified line, a base64 blob): cut by
    # characters, which each count at most one token.
    return [
        (text[start : start + budget], count_tokens(text[start : start + budget]), glue if start == 0 else "")
        for start in range(0, len(text), budget)
    ]


class _Packer:
    """Packs one section's blocks into chunk texts of about target size, never above max size."""

    def __init__(self, target_tokens: int, max_tokens: int, overlap_tokens: int):
        self.target = target_tokens
        self.max = max_tokens
        self.overlap = overlap_tokens
        # Per section: the kind of each block, and (prefix, suffix, their tokens) of split blocks.
        self._kinds: list[str] = []
        self._wrappers: dict[int, tuple[str, str, int]] = {}

    def pack(self, blocks: Iterable[Block]) -> Iterator[tuple[str, int]]:
        """(content, n_tokens) of each chunk of one section, as its blocks are read."""
        self._kinds = []
        self._wrappers = {}

        def pieces() -> Iterator[_Piece]:
            for index, block in enumerate(blocks):
                self._kinds.append(block.kind)
                yield from self._pieces(index, block)

        for group in self._group(pieces()):
            yield self._render(group)

    def _pieces(self, index: int, block: Block) -> list[_Piece]:
        if len(block.text) <= self.max * _CHARS_WORTH_COUNTING:
            tokens = count_tokens(block.text)
            if tokens <= self.max:
                return [_Piece(block.text, tokens, index)]
        prefix, body, suffix = block.prefix, block.body, block.suffix
        wrap = count_tokens(prefix) + count_tokens(suffix)
        if body is None or not body.strip() or wrap > self.max // 2:
            prefix, body, suffix, wrap = "", block.text, "", 0
        if wrap:
            self._wrappers[index] = (prefix, suffix, wrap)
        parts = _split(body, self.max - wrap, _SPLITTERS[block.kind])
        # Neighbouring small parts (lines, sentences) travel together up to the target
        # size, which keeps the number of pieces of a huge block small.
        merge_limit = max(self.target - wrap, 1)
        pieces: list[_Piece] = []
        for text, tokens, glue in parts:
            last = pieces[-1] if pieces else None
            if last is not None and glue and last.tokens + tokens <= merge_limit:
                last.text = last.text + glue + text
                last.tokens += tokens
            else:
                pieces.append(_Piece(text, tokens, index, glue))
        return pieces

    def _cost(self, pieces: Sequence[_Piece]) -> int:
        total = 0
        previous_block = -1
        for piece in pieces:
            total += piece.tokens
            if piece.block != previous_block and piece.block in self._wrappers:
                total += self._wrappers[piece.block][2]
            previous_block = piece.block
        return total

    def _added_cost(self, current: list[_Piece], piece: _Piece) -> int:
        new_group = not current or current[-1].block != piece.block
        return piece.tokens + (self._wrappers[piece.block][2] if new_group and piece.block in self._wrappers else 0)

    def _group(self, pieces: Iterable[_Piece]) -> Iterator[list[_Piece]]:
        held: list[_Piece] | None = None  # the last finished group, held back: a small tail may join it
        current: list[_Piece] = []
        size = 0
        has_new_text = False
        for piece in pieces:
            cost = self._added_cost(current, piece)
            if has_new_text:
                fits = size + cost <= self.target or (size < self.target // 2 and size + cost <= self.max)
                if not fits:
                    if held is not None:
                        yield held
                    held = current
                    current = self._overlap_pieces(current, piece)
                    size = self._cost(current)
                    has_new_text = False
                    cost = self._added_cost(current, piece)
            if not has_new_text and size + cost > self.max:
                current, size = [], 0
                cost = self._added_cost(current, piece)
            current.append(piece)
            size += cost
            has_new_text = True
        if not has_new_text:  # no piece at all
            return
        # A small tail joins the chunk before it when both fit in one chunk.
        if held is not None:
            tail = [piece for piece in current if not piece.overlap]
            merged = held + tail
            if self._cost(tail) < self.target // 4 and self._cost(merged) <= self.max:
                yield merged
                return
            yield held
        yield current

    def _overlap_pieces(self, previous: list[_Piece], following: _Piece) -> list[_Piece]:
        """The end of the previous chunk (whole pieces, sentences or lines) that opens the next one.

        Code overlaps only when the next chunk continues the same block, since its last
        lines alone, outside the block, would read as a broken fragment. Tables never
        overlap: a continued table repeats its header instead, and a repeated row would
        read as duplicate data.
        """
        budget = self.overlap
        taken: list[_Piece] = []
        if not budget:
            return taken
        for index in range(len(previous) - 1, -1, -1):
            piece = previous[index]
            kind = self._kinds[piece.block]
            if kind == TABLE or (kind == CODE and piece.block != following.block):
                break
            if index > 0 and piece.tokens <= budget:
                taken.append(replace(piece, overlap=True))
                budget -= piece.tokens
                continue
            splitters = (_SENTENCES, _LINES) if kind == TEXT else (_LINES,)
            taken.extend(_tail_pieces(piece, budget, splitters))
            break
        taken.reverse()
        if taken and self._cost(taken) + self._added_cost(taken, following) > self.max:
            return []
        return taken

    def _render(self, pieces: list[_Piece]) -> tuple[str, int]:
        # Token counts add up over whitespace, so the sum of the pieces is exact unless a
        # word was cut by characters (glue ""), where recounting can only give less.
        parts: list[str] = []
        exact = True
        index = 0
        while index < len(pieces):
            block = pieces[index].block
            end = index + 1
            while end < len(pieces) and pieces[end].block == block:
                end += 1
            exact = exact and all(piece.glue for piece in pieces[index + 1 : end])
            body = pieces[index].text + "".join(piece.glue + piece.text for piece in pieces[index + 1 : end])
            if block in self._wrappers:
                prefix, suffix, _ = self._wrappers[block]
                body = "\n".join(part for part in (prefix, body, suffix) if part)
            parts.append(body)
            index = end
        content = "\n\n".join(parts)
        return content, self._cost(pieces) if exact else count_tokens(content)


def _tail_pieces(piece: _Piece, budget: int, splitters: Sequence[_Splitter]) -> list[_Piece]:
    """The longest run of whole trailing sentences (or lines) of `piece` within budget, never all of it."""
    # No token is longer than a dozen characters with its whitespace, so looking at the
    # end of the text is enough; the first (possibly cut) part of the window is never used.
    window = piece.text[-(budget * 12 + 200) :]
    for splitter in splitters:
        parts = splitter(window)
        if len(parts) < 2:
            continue
        tail: list[_Piece] = []
        for text, glue in reversed(parts[1:]):
            tokens = count_tokens(text)
            if tokens > budget:
                break
            tail.append(_Piece(text, tokens, piece.block, glue, overlap=True))
            budget -= tokens
        if tail:
            return tail
    return []


def document_problem(source: SourceFile) -> str | None:
    """Why a source file cannot be chunked (it names the file, the problem and the fix), or None."""
    try:
        if not chunk_document(read_document(source)):
            return f"{source.path}: no text to chunk (the document is empty after parsing). Add text to it or remove it."
    except DocumentError as error:
        return str(error)
    return None
