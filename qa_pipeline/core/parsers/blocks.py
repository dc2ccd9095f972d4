"""What the parsers produce: blocks of text, code or tables under a heading path, and helpers they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

TEXT, CODE, TABLE = "text", "code", "table"


@dataclass(slots=True)
class Block:
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


class Headings:
    """The current heading path: a stack of (level, title)."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, str]] = []
        self.path: tuple[str, ...] = ()

    def enter(self, level: int, title: str) -> None:
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, title))
        self.path = tuple(title for _, title in self._stack)



def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def indented_end(lines: Sequence[str], start: int, base_indent: int) -> int:
    """End of the block from `start` over blank lines and lines indented deeper than base_indent."""
    end = start
    for index in range(start, len(lines)):
        line = lines[index]
        if line.strip():
            if indent(line) <= base_indent:
                break
            end = index + 1
    return end


def table_block(lines: list[str], heading_path: tuple[str, ...], header_end: int) -> Block:
    """A table whose first `header_end` lines are repeated on every piece it is split into."""
    return Block(
        TABLE,
        "\n".join(lines),
        heading_path,
        prefix="\n".join(lines[:header_end]),
        body="\n".join(lines[header_end:]),
    )
