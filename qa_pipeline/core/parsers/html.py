"""HTML to Markdown: headings, paragraphs, lists, `pre` blocks and pipe tables of a page's own content.

A documentation site's menus, banners, sidebars and footers are dropped, so they never become QA pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

_HTML_SKIPPED = {"script", "style", "noscript", "template", "svg", "title"}
_HTML_BLOCKS = {
    "p", "div", "section", "article", "main", "header", "footer", "aside", "nav", "blockquote",
    "ul", "ol", "dl", "dt", "dd", "figure", "figcaption", "form", "hr", "address", "details",
    "summary", "body", "html", "fieldset", "center",
}  # fmt: skip
_HTML_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_SPACES = re.compile(r"[ \t\n\r\f\v]+")
# Paragraph lines that the Markdown chunker would take for a heading, a fence or a rule.
_MARKDOWN_LOOKALIKE = re.compile(r"^(?:#{1,6}(?=[ \t]|$)|```|~~~|[-=*_]{3,}[ \t]*$)", re.MULTILINE)
_LINE_BREAK = "\x00"  # <br>; NUL cannot occur in an HTML document that passed the binary check
# Page furniture, dropped with everything inside: a site's menus, sidebars and footers are not what it documents.
# A <header> is furniture only outside main/article: inside, it holds the page's title.
_FURNITURE_TAGS = {"nav", "aside", "footer"}
_FURNITURE_ROLES = {"navigation", "banner", "contentinfo", "complementary"}
# When a page has these, only their text is kept.
_CONTENT_TAGS = {"main", "article"}
# Elements without an end tag: they cannot enclose furniture or content.
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
# Large pages are fed to the parser in pieces of this many characters.
_FEED_CHARS = 1 << 20


def html_to_markdown(html: str) -> str:
    """Markdown text of an HTML page: headings, paragraphs, lists, `pre` blocks and pipe tables.

    Navigation, banners, sidebars and footers (`nav`, `header`, `footer`, `aside` and their ARIA roles) are
    dropped; when the page has `main` or `article` content, only that is kept.
    """
    converter = _HtmlToMarkdown()
    for start in range(0, len(html), _FEED_CHARS):
        converter.feed(html[start : start + _FEED_CHARS])
    converter.close()
    return converter.markdown()


@dataclass
class _Table:
    rows: list[list[str]] = field(default_factory=list)
    row: list[str] | None = None
    cell: list[str] | None = None
    caption: list[str] = field(default_factory=list)


class _Element:
    """One open element, closed by its own end tag; same-name elements inside it are counted so they do not close it."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._open = 1

    def start(self, tag: str) -> None:
        if tag == self.tag:
            self._open += 1

    def end(self, tag: str) -> bool:
        """Whether this end tag closes the element."""
        if tag == self.tag:
            self._open -= 1
        return self._open == 0


def _role(attrs: list[tuple[str, str | None]]) -> str | None:
    """The element's ARIA role (the first of a fallback list)."""
    for name, value in attrs:
        if name == "role" and value and value.split():
            return value.split()[0].lower()
    return None


class _HtmlToMarkdown(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._blocks: list[str] = []
        self._content_blocks: list[str] = []  # the blocks inside main/article
        self._furniture: _Element | None = None
        self._content: _Element | None = None
        self._inline: list[str] = []
        self._skip_depth = 0
        self._pre: list[str] | None = None
        self._pre_language = ""
        self._heading_level = 0
        self._tables: list[_Table] = []
        self._lists: list[list[int]] = []  # one [ordered, counter] per open list
        self._item_prefix = ""

    def markdown(self) -> str:
        self._flush_inline()
        while self._tables:
            self._end_table()
        if self._pre is not None:
            self._end_pre()
        blocks = self._content_blocks or self._blocks
        return "\n\n".join(blocks) + ("\n" if blocks else "")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, has_end=tag not in _VOID_TAGS)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _HTML_SKIPPED:
            self._start(tag, attrs, has_end=False)

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], has_end: bool) -> None:
        if tag in _HTML_SKIPPED:
            self._skip_depth += 1
            return
        if self._skip_depth:
            return
        if self._furniture is not None:
            if has_end:
                self._furniture.start(tag)
            return
        if has_end and self._is_furniture(tag, attrs):
            self._flush_inline()
            self._furniture = _Element(tag)
            return
        if has_end and self._content is not None:
            self._content.start(tag)
        elif has_end and (tag in _CONTENT_TAGS or _role(attrs) == "main"):
            self._flush_inline()
            self._content = _Element(tag)
        if self._pre is not None:
            if tag == "code" and not self._pre_language:
                self._pre_language = _code_language(attrs)
            return
        if self._tables and tag != "table":
            if tag in ("tr", "td", "th"):
                self._table_start_tag(tag)
            elif tag == "br":
                self._text(" ")
            return
        if tag == "br":
            self._inline.append(_LINE_BREAK)
        elif tag in _HTML_HEADINGS:
            self._flush_inline()
            self._heading_level = _HTML_HEADINGS[tag]
        elif tag == "pre":
            self._flush_inline()
            self._pre = []
            self._pre_language = _code_language(attrs)
        elif tag in ("ul", "ol"):
            self._flush_inline()
            self._lists.append([tag == "ol", 0])
        elif tag == "li":
            self._flush_inline()
            depth = max(len(self._lists), 1)
            marker = "-"
            if self._lists and self._lists[-1][0]:
                self._lists[-1][1] += 1
                marker = f"{self._lists[-1][1]}."
            self._item_prefix = "  " * (depth - 1) + marker + " "
        elif tag == "table":
            self._flush_inline()
            self._tables.append(_Table())
        elif tag in _HTML_BLOCKS:
            self._flush_inline()
        elif tag == "code":
            self._inline.append("`")

    def _is_furniture(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if _role(attrs) in _FURNITURE_ROLES:
            return True
        if tag == "header":
            return self._content is None
        return tag in _FURNITURE_TAGS

    def handle_endtag(self, tag: str) -> None:
        if tag in _HTML_SKIPPED:
            self._skip_depth = max(self._skip_depth - 1, 0)
            return
        if self._skip_depth:
            return
        if self._furniture is not None:
            if self._furniture.end(tag):
                self._furniture = None
            return
        closes_content = self._content is not None and self._content.end(tag)
        self._end(tag)
        if closes_content:
            self._flush_inline()  # text still open belongs to the content
            self._content = None

    def _end(self, tag: str) -> None:
        if self._pre is not None:
            if tag == "pre":
                self._end_pre()
            return
        if self._tables:
            self._table_end_tag(tag)
            return
        if tag in _HTML_HEADINGS:
            self._flush_inline()
            self._heading_level = 0
        elif tag in ("ul", "ol"):
            self._flush_inline()
            if self._lists:
                self._lists.pop()
        elif tag in _HTML_BLOCKS or tag == "li":
            self._flush_inline()
        elif tag == "code":
            self._inline.append("`")

    def handle_data(self, data: str) -> None:
        if self._skip_depth or self._furniture is not None:
            return
        if self._pre is not None:
            self._pre.append(data)
        else:
            self._text(data)

    def _text(self, data: str) -> None:
        if self._tables:
            table = self._tables[-1]
            (table.cell if table.cell is not None else table.caption).append(data)
        else:
            self._inline.append(data)

    def _table_start_tag(self, tag: str) -> None:
        table = self._tables[-1]
        if tag == "tr":
            self._end_row(table)
            table.row = []
        elif tag in ("td", "th"):
            self._end_cell(table)
            if table.row is None:
                table.row = []
            table.cell = []

    def _table_end_tag(self, tag: str) -> None:
        table = self._tables[-1]
        if tag in ("td", "th"):
            self._end_cell(table)
        elif tag == "tr":
            self._end_row(table)
        elif tag == "table":
            self._end_table()

    def _end_cell(self, table: _Table) -> None:
        if table.cell is not None:
            text = _SPACES.sub(" ", "".join(table.cell)).strip().replace("|", "\\|")
            if table.row is None:
                table.row = []
            table.row.append(text)
            table.cell = None

    def _end_row(self, table: _Table) -> None:
        self._end_cell(table)
        if table.row:
            table.rows.append(table.row)
        table.row = None

    def _end_table(self) -> None:
        table = self._tables.pop()
        self._end_row(table)
        caption = _SPACES.sub(" ", "".join(table.caption)).strip()
        if self._tables:  # a table inside a cell becomes text of that cell
            flat = "; ".join(", ".join(cell for cell in row if cell) for row in table.rows)
            self._text(" ".join(part for part in (caption, flat) if part))
            return
        if caption:
            self._emit(_escape_markdown(caption))
        if table.rows:
            self._emit(_pipe_table(table.rows))

    def _end_pre(self) -> None:
        text = "".join(self._pre or [])
        self._pre = None
        if text.startswith("\n"):  # HTML ignores a newline right after <pre>
            text = text[1:]
        text = text.rstrip()
        if text.strip():
            fence = "```"
            while fence in text:
                fence += "`"
            self._emit(f"{fence}{self._pre_language}\n{text}\n{fence}")
        self._pre_language = ""

    def _emit(self, block: str) -> None:
        self._blocks.append(block)
        if self._content is not None:
            self._content_blocks.append(block)

    def _flush_inline(self) -> None:
        raw = "".join(self._inline)
        self._inline = []
        lines = [_SPACES.sub(" ", part).strip() for part in raw.split(_LINE_BREAK)]
        text = "\n".join(line for line in lines if line)
        if not text:
            return  # an empty <p> inside <li> must not use up the item's marker
        level, self._heading_level = self._heading_level, 0
        prefix, self._item_prefix = self._item_prefix, ""
        if level:
            self._emit("#" * level + " " + text.replace("\n", " "))
        elif prefix:
            self._emit(prefix + text)
        else:
            self._emit(_escape_markdown(text))


def _code_language(attrs: list[tuple[str, str | None]]) -> str:
    for name, value in attrs:
        if name == "class" and value:
            for css_class in value.split():
                if css_class.startswith(("language-", "lang-")):
                    return css_class.split("-", 1)[1]
    return ""


def _escape_markdown(text: str) -> str:
    """Keep paragraph text from being read back as a Markdown heading, fence or rule."""
    return _MARKDOWN_LOOKALIKE.sub(lambda match: "\\" + match.group(), text)


def _pipe_table(rows: list[list[str]]) -> str:
    width = max(len(row) for row in rows)
    lines = []
    for index, row in enumerate(rows):
        cells = row + [""] * (width - len(row))
        lines.append("| " + " | ".join(cells) + " |")
        if index == 0:
            lines.append("|" + " --- |" * width)
    return "\n".join(lines)

