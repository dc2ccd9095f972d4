"""Plain text: one block per paragraph, without headings."""

from __future__ import annotations

import re
from collections.abc import Iterable

from qa_pipeline.core.parsers.blocks import TEXT, Block

_BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")


def parse_text(text: str) -> Iterable[Block]:
    for paragraph in _BLANK_LINES.split(text):
        if paragraph.strip():
            yield Block(TEXT, paragraph.rstrip(), ())
