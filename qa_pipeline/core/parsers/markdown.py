"""Markdown: ATX and setext headings, fenced and indented code, pipe tables; front matter is skipped."""

from __future__ import annotations

import re
from collections.abc import Iterable

from qa_pipeline.core.parsers.blocks import CODE, TEXT, Block, Headings, indented_end, table_block

# Fences are recognised at any indentation so that code inside list items stays whole.
_MD_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_MD_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_MD_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_MD_BREAK = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_MD_TABLE_DELIMITER = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_MD_LIST_ITEM = re.compile(r"^\s*([-*+]|\d{1,9}[.)])(\s|$)")


def parse_markdown(text: str) -> Iterable[Block]:
    lines = text.split("\n")
    count = len(lines)
    headings = Headings()
    paragraph: list[str] = []
    after_list = False
    index = 0
    if lines and lines[0].strip() == "---":  # YAML front matter is site metadata, not prose
        for end in range(1, min(count, 200)):
            if lines[end].strip() in ("---", "..."):
                index = end + 1
                break

    def flush() -> Iterable[Block]:
        nonlocal paragraph, after_list
        if paragraph:
            after_list = bool(_MD_LIST_ITEM.match(paragraph[0]))
            yield Block(TEXT, "\n".join(paragraph), headings.path)
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
            yield Block(CODE, block_text, headings.path, prefix=line, body=body, suffix=closing)
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
            yield table_block(rows, headings.path, header_end=2)
            index = end
            after_list = False
            continue
        if not paragraph and not after_list and (line.startswith("    ") or line.startswith("\t")):
            end = indented_end(lines, index, 3)
            yield Block(CODE, "\n".join(lines[index:end]), headings.path)
            index = end
            continue
        paragraph.append(line)
        index += 1
    yield from flush()
