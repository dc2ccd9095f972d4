"""reStructuredText: section titles, literal blocks, directives, grid and simple tables; markup is dropped."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from qa_pipeline.core.parsers.blocks import CODE, TABLE, TEXT, Block, Headings, indent, indented_end, table_block

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


def parse_rst(text: str) -> Iterable[Block]:
    lines = text.split("\n")
    count = len(lines)
    headings = Headings()
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
            end = indented_end(lines, index + 1, indent(line))
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
            yield Block(CODE, "\n".join(paragraph), headings.path)
            index = end
            continue
        index = end
        if paragraph[-1].rstrip().endswith("::"):
            if stripped != "::":  # "::" alone is pure markup
                yield Block(TEXT, "\n".join(paragraph), headings.path)
            while index < count and not lines[index].strip():
                index += 1
            if index < count and indent(lines[index]) > indent(line):
                end = indented_end(lines, index, indent(line))
                yield Block(CODE, "\n".join(lines[index:end]), headings.path)
                index = end
            continue
        yield Block(TEXT, "\n".join(paragraph), headings.path)


def _rst_explicit_block(lines: list[str], heading_path: tuple[str, ...]) -> Block | None:
    """A directive, footnote or target as a block; None for comments and markup-only directives."""
    first = lines[0].strip()
    directive = _RST_DIRECTIVE.match(lines[0])
    if directive is None:
        if first.startswith((".. [", ".. _", ".. __")):  # footnotes, citations, link targets
            return Block(TEXT, "\n".join(lines), heading_path)
        return None  # comments and substitution definitions
    name = directive.group(1).lower()
    if name in _RST_DROPPED_DIRECTIVES:
        return None
    if name not in _RST_CODE_DIRECTIVES and name not in _RST_TABLE_DIRECTIVES:
        return Block(TEXT, "\n".join(lines), heading_path)
    # Header = directive line and its options, up to the first blank line.
    header_end = 1
    while header_end < len(lines) and lines[header_end].strip():
        header_end += 1
    prefix = "\n".join(lines[:header_end]) + "\n"
    body = "\n".join(lines[header_end:]).strip("\n")
    kind = CODE if name in _RST_CODE_DIRECTIVES else TABLE
    return Block(kind, "\n".join(lines), heading_path, prefix=prefix, body=body or None)


def _rst_grid_table(lines: list[str], heading_path: tuple[str, ...]) -> Block:
    header_end = 1
    for index, line in enumerate(lines):
        if "=" in line and _RST_GRID_BORDER.match(line):
            header_end = index + 1
            break
    return table_block(lines, heading_path, header_end)


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


def _rst_simple_table(lines: list[str], heading_path: tuple[str, ...]) -> Block:
    borders = [index for index, line in enumerate(lines) if _RST_SIMPLE_BORDER.match(line)]
    header_end = borders[1] + 1 if len(borders) >= 3 else 1
    return table_block(lines, heading_path, header_end)
