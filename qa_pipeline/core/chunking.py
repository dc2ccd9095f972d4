"""Split a document into chunks of about a target token count that follow its headings, code and tables."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
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
    """Chunks of `document` in reading order.

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
        return [_record_chunk(document.key, position, record) for position, record in enumerate(document.records)]
    parse = _PARSERS[document.format]
    packer = _Packer(target_tokens, max_tokens, overlap_tokens)
    chunks: list[Chunk] = []
    for heading_path, blocks in _sections(parse(document.text)):
        for content, n_tokens in packer.pack(blocks):
            digest = content_hash(content)
            position = len(chunks)
            chunks.append(
                Chunk(
                    document=document.key,
                    chunk_id=chunk_id(document.key, position, digest),
                    position=position,
                    heading_path=list(heading_path),
                    content=content,
                    n_tokens=n_tokens,
                    content_hash=digest,
                )
            )
    return chunks


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


# --- blocks ---------------------------------------------------------------------------

TEXT, CODE, TABLE = "text", "code", "table"


@dataclass(slots=True)
class _Block:
    """A paragraph, code block or table under one heading path.

    When the block must be split, `body` is what is cut into pieces and `prefix` /
    `suffix` (a code fence, a table header, a directive line) wrap every piece.
    """

    kind: str
    text: str
    heading_path: tuple[str, ...]
    prefix: str = ""
    body: str | None = None
    suffix: str = ""


class _Headings:
    """The current heading path: a stack of (level, title)."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, str]] = []
        self.path: tuple[str, ...] = ()

    def enter(self, level: int, title: str) -> None:
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, title))
        self.path = tuple(title for _, title in self._stack)


def _sections(blocks: Iterable[_Block]) -> Iterable[tuple[tuple[str, ...], list[_Block]]]:
    current: list[_Block] = []
    for block in blocks:
        if current and block.heading_path != current[0].heading_path:
            yield current[0].heading_path, current
            current = []
        current.append(block)
    if current:
        yield current[0].heading_path, current


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _indented_end(lines: Sequence[str], start: int, base_indent: int) -> int:
    """End of the block from `start` over blank lines and lines indented deeper than base_indent."""
    end = start
    for index in range(start, len(lines)):
        line = lines[index]
        if line.strip():
            if _indent(line) <= base_indent:
                break
            end = index + 1
    return end


# --- plain text -----------------------------------------------------------------------

_BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")


def _parse_text(text: str) -> Iterable[_Block]:
    for paragraph in _BLANK_LINES.split(text):
        if paragraph.strip():
            yield _Block(TEXT, paragraph.rstrip(), ())


# --- Markdown -------------------------------------------------------------------------

# Fences are recognised at any indentation so that code inside list items stays whole.
_MD_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_MD_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_MD_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_MD_BREAK = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_MD_TABLE_DELIMITER = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_MD_LIST_ITEM = re.compile(r"^\s*([-*+]|\d{1,9}[.)])(\s|$)")


def _parse_markdown(text: str) -> Iterable[_Block]:
    lines = text.split("\n")
    count = len(lines)
    headings = _Headings()
    paragraph: list[str] = []
    after_list = False
    index = 0
    if lines and lines[0].strip() == "---":  # YAML front matter is site metadata, not prose
        for end in range(1, min(count, 200)):
            if lines[end].strip() in ("---", "..."):
                index = end + 1
                break

    def flush() -> Iterable[_Block]:
        nonlocal paragraph, after_list
        if paragraph:
            after_list = bool(_MD_LIST_ITEM.match(paragraph[0]))
            yield _Block(TEXT, "\n".join(paragraph), headings.path)
            paragraph = []

    while index < count:
        line = lines[index]
        stripped = line.strip()
        if not stripped:
            yield from flush()
            index += 1
            continue
        first = stripped[0]
        if first in "`~" and (fence := _MD_FENCE.match(line)):
            yield from flush()
            marker = fence.group(1)
            end = index + 1
            while end < count and not (
                lines[end].strip().startswith(marker) and set(lines[end].strip()) == {marker[0]}
            ):
                end += 1
            closed = end < count
            body = "\n".join(lines[index + 1 : end])
            closing = lines[end] if closed else ""
            block_text = "\n".join(lines[index : end + 1] if closed else lines[index:end])
            yield _Block(CODE, block_text, headings.path, prefix=line, body=body, suffix=closing)
            index = end + 1
            after_list = False
            continue
        if first == "#" and (atx := _MD_ATX.match(line)):
            yield from flush()
            title = (atx.group(2) or "").strip()
            if title:
                headings.enter(len(atx.group(1)), title)
            index += 1
            after_list = False
            continue
        if first in "=-" and _MD_SETEXT.match(line):
            if paragraph and not _MD_LIST_ITEM.match(paragraph[0]):
                title = " ".join(part.strip() for part in paragraph)
                paragraph = []
                headings.enter(1 if first == "=" else 2, title)
                index += 1
                after_list = False
                continue
        if first in "-*_" and not paragraph and _MD_BREAK.match(line):
            index += 1
            continue
        if (
            "|" in line
            and index + 1 < count
            and "|" in lines[index + 1]
            and "-" in lines[index + 1]
            and _MD_TABLE_DELIMITER.match(lines[index + 1])
        ):
            yield from flush()
            end = index + 2
            while end < count and lines[end].strip() and "|" in lines[end]:
                end += 1
            rows = lines[index:end]
            yield _table_block(rows, headings.path, header_end=2)
            index = end
            after_list = False
            continue
        if not paragraph and not after_list and (line.startswith("    ") or line.startswith("\t")):
            end = _indented_end(lines, index, 3)
            yield _Block(CODE, "\n".join(lines[index:end]), headings.path)
            index = end
            continue
        paragraph.append(line)
        index += 1
    yield from flush()


# --- reStructuredText -----------------------------------------------------------------

_RST_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1+[ \t]*$")
_RST_EXPLICIT = re.compile(r"^\s*\.\.(\s|$)")
_RST_DIRECTIVE = re.compile(r"^\s*\.\.\s+([\w:.+-]+?)::(\s|$)")
_RST_GRID_BORDER = re.compile(r"^\s*\+(?:[-=]+\+)+\s*$")
_RST_SIMPLE_BORDER = re.compile(r"^\s*=+(?: +=+)+\s*$")
_RST_CODE_DIRECTIVES = {
    "code", "code-block", "sourcecode", "doctest", "testcode", "testoutput", "math",
    "productionlist", "parsed-literal", "literalinclude", "highlight", "prompt",
}  # fmt: skip
_RST_TABLE_DIRECTIVES = {"table", "csv-table", "list-table"}
# Directives that render no prose of their own (or only markup for other tools).
_RST_DROPPED_DIRECTIVES = {
    "contents", "toctree", "sectnum", "section-numbering", "raw", "include", "image", "meta",
    "index", "target-notes", "header", "footer", "title", "role", "default-role", "only",
}  # fmt: skip


def _parse_rst(text: str) -> Iterable[_Block]:
    lines = text.split("\n")
    count = len(lines)
    headings = _Headings()
    styles: list[tuple[str, bool]] = []  # title styles in order of first use = levels

    def level(char: str, overlined: bool) -> int:
        if (char, overlined) not in styles:
            styles.append((char, overlined))
        return styles.index((char, overlined)) + 1

    index = 0
    while index < count:
        line = lines[index]
        stripped = line.strip()
        if not stripped:
            index += 1
            continue
        adornment = _RST_ADORNMENT.match(line)
        next_line = lines[index + 1] if index + 1 < count else ""
        if (
            adornment
            and index + 2 < count
            and next_line.strip()
            and lines[index + 2].strip() == stripped
        ):
            headings.enter(level(adornment.group(1), True), next_line.strip())
            index += 3
            continue
        if (
            not adornment
            and not line[0].isspace()
            and (underline := _RST_ADORNMENT.match(next_line))
            and (len(next_line.rstrip()) >= len(stripped) or len(next_line.rstrip()) >= 4)
        ):
            headings.enter(level(underline.group(1), False), stripped)
            index += 2
            continue
        if adornment and len(stripped) >= 4:  # a transition line
            index += 1
            continue
        if stripped.startswith("..") and _RST_EXPLICIT.match(line):
            end = _indented_end(lines, index + 1, _indent(line))
            block = _rst_explicit_block(lines[index:end], headings.path)
            if block is not None:
                yield block
            index = end
            continue
        if stripped[0] == "+" and _RST_GRID_BORDER.match(line):
            end = index + 1
            while end < count and lines[end].strip()[:1] in ("+", "|"):
                end += 1
            yield _rst_grid_table(lines[index:end], headings.path)
            index = end
            continue
        if stripped[0] == "=" and _RST_SIMPLE_BORDER.match(line):
            end = _rst_simple_table_end(lines, index)
            yield _rst_simple_table(lines[index:end], headings.path)
            index = end
            continue
        end = index + 1
        while end < count and lines[end].strip():
            end += 1
        paragraph = lines[index:end]
        if stripped.startswith(">>>"):
            yield _Block(CODE, "\n".join(paragraph), headings.path)
            index = end
            continue
        index = end
        if paragraph[-1].rstrip().endswith("::"):
            if stripped != "::":  # "::" alone is pure markup
                yield _Block(TEXT, "\n".join(paragraph), headings.path)
            while index < count and not lines[index].strip():
                index += 1
            if index < count and _indent(lines[index]) > _indent(line):
                end = _indented_end(lines, index, _indent(line))
                yield _Block(CODE, "\n".join(lines[index:end]), headings.path)
                index = end
            continue
        yield _Block(TEXT, "\n".join(paragraph), headings.path)


def _rst_explicit_block(lines: list[str], heading_path: tuple[str, ...]) -> _Block | None:
    """A directive, footnote or target as a block; None for comments and markup-only directives."""
    first = lines[0].strip()
    directive = _RST_DIRECTIVE.match(lines[0])
    if directive is None:
        if first.startswith((".. [", ".. _", ".. __")):  # footnotes, citations, link targets
            return _Block(TEXT, "\n".join(lines), heading_path)
        return None  # comments and substitution definitions
    name = directive.group(1).lower()
    if name in _RST_DROPPED_DIRECTIVES:
        return None
    if name not in _RST_CODE_DIRECTIVES and name not in _RST_TABLE_DIRECTIVES:
        return _Block(TEXT, "\n".join(lines), heading_path)
    # Header = directive line and its options, up to the first blank line.
    header_end = 1
    while header_end < len(lines) and lines[header_end].strip():
        header_end += 1
    prefix = "\n".join(lines[:header_end]) + "\n"
    body = "\n".join(lines[header_end:]).strip("\n")
    kind = CODE if name in _RST_CODE_DIRECTIVES else TABLE
    return _Block(kind, "\n".join(lines), heading_path, prefix=prefix, body=body or None)


def _rst_grid_table(lines: list[str], heading_path: tuple[str, ...]) -> _Block:
    header_end = 1
    for index, line in enumerate(lines):
        if "=" in line and _RST_GRID_BORDER.match(line):
            header_end = index + 1
            break
    return _table_block(lines, heading_path, header_end)


def _table_block(lines: list[str], heading_path: tuple[str, ...], header_end: int) -> _Block:
    """A table whose first `header_end` lines are repeated on every piece it is split into."""
    return _Block(
        TABLE,
        "\n".join(lines),
        heading_path,
        prefix="\n".join(lines[:header_end]),
        body="\n".join(lines[header_end:]),
    )


def _rst_simple_table_end(lines: Sequence[str], start: int) -> int:
    """Index after a simple table: its last border is followed by a blank line or the end."""
    count = len(lines)
    for index in range(start + 1, count):
        if _RST_SIMPLE_BORDER.match(lines[index]) and (index + 1 == count or not lines[index + 1].strip()):
            return index + 1
    end = start + 1
    while end < count and lines[end].strip():
        end += 1
    return end


def _rst_simple_table(lines: list[str], heading_path: tuple[str, ...]) -> _Block:
    borders = [index for index, line in enumerate(lines) if _RST_SIMPLE_BORDER.match(line)]
    header_end = borders[1] + 1 if len(borders) >= 3 else 1
    return _table_block(lines, heading_path, header_end)


_PARSERS: dict[DocumentFormat, Callable[[str], Iterable[_Block]]] = {
    DocumentFormat.MARKDOWN: _parse_markdown,
    DocumentFormat.HTML: _parse_markdown,  # read_document converts HTML to Markdown
    DocumentFormat.RST: _parse_rst,
    DocumentFormat.TEXT: _parse_text,
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

    def pack(self, blocks: list[_Block]) -> list[tuple[str, int]]:
        """(content, n_tokens) of each chunk of one section."""
        self._kinds = [block.kind for block in blocks]
        self._wrappers = {}
        pieces: list[_Piece] = []
        for index, block in enumerate(blocks):
            pieces.extend(self._pieces(index, block))
        return [self._render(group) for group in self._group(pieces)]

    def _pieces(self, index: int, block: _Block) -> list[_Piece]:
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

    def _group(self, pieces: list[_Piece]) -> list[list[_Piece]]:
        groups: list[list[_Piece]] = []
        current: list[_Piece] = []
        size = 0
        has_new_text = False
        for piece in pieces:
            cost = self._added_cost(current, piece)
            if has_new_text:
                fits = size + cost <= self.target or (size < self.target // 2 and size + cost <= self.max)
                if not fits:
                    groups.append(current)
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
        if has_new_text:
            groups.append(current)
        # A small tail joins the chunk before it when both fit in one chunk.
        if len(groups) >= 2:
            tail = [piece for piece in groups[-1] if not piece.overlap]
            merged = groups[-2] + tail
            if self._cost(tail) < self.target // 4 and self._cost(merged) <= self.max:
                groups[-2:] = [merged]
        return groups

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
