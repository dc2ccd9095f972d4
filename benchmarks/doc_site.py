"""Benchmark corpus P6/P7: a documentation site of 300 pages, made from the PEPs in /work/shared/corpus.

Each PEP is cut at its top-level sections, as a doc site has a page per topic; a section longer than
20 chunks is cut again at its subsections. The PEP header, "References", "Footnotes" and "Copyright"
become no page. Most pages are then one to three chunks, a few up to twenty. The same corpus gives
the same pages, byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qa_pipeline.core.chunking import chunk_document
from qa_pipeline.core.documents import read_document

PEPS = Path("/work/shared/corpus/peps")
PAGES = 300
MAX_CHUNKS_PER_PAGE = 20
_SKIPPED_SECTIONS = {"references", "footnotes", "copyright"}
_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+.:_])\1{3,}\s*$")
# Heading characters by depth below the page's title, so every page uses the same style.
_UNDERLINES = "=-~^\"'"
_REVISION = " (Revised for this release.)"


@dataclass
class Section:
    level: int  # 1 for the PEP's top-level sections; 0 for the text before the first one
    title: str
    lines: list[str]
    children: list[Section]


@dataclass(frozen=True)
class Page:
    key: str  # its path under the sources folder, e.g. "pep-0008/03-code-lay-out.rst"
    text: str
    chunks: int


def _sections(text: str) -> list[Section]:
    """The PEP's sections as a tree; levels in order of first use of each underline character."""
    styles: list[str] = []
    root = Section(0, "", [], [])
    stack = [root]
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        following = lines[index + 1] if index + 1 < len(lines) else ""
        underline = _ADORNMENT.match(following)
        if (
            line.strip()
            and not line[0].isspace()
            and not _ADORNMENT.match(line)
            and underline
            and len(following.rstrip()) >= len(line.rstrip())
        ):
            char = underline.group(1)
            if char not in styles:
                styles.append(char)
            section = Section(styles.index(char) + 1, line.strip(), [], [])
            while stack[-1].level >= section.level:
                stack.pop()
            stack[-1].children.append(section)
            stack.append(section)
            index += 2
            continue
        stack[-1].lines.append(line)
        index += 1
    return [root, *root.children]


def _render(section: Section, title: str, depth: int = 0) -> str:
    heading = title if depth == 0 else section.title
    underline = _UNDERLINES[min(depth, len(_UNDERLINES) - 1)] * max(4, len(heading))
    body = "\n".join(section.lines).strip("\n")
    parts = [f"{heading}\n{underline}\n", *([body + "\n"] if body else [])]
    parts += [_render(child, title, depth + 1) for child in section.children]
    return "\n".join(parts)


def _chunk_count(text: str, scratch: Path) -> int:
    scratch.write_text(text, encoding="utf-8")
    return len(chunk_document(read_document(scratch)))


def _pep_title(text: str) -> str:
    match = re.search(r"^PEP:\s*(\d+)\s*\nTitle:\s*(.+)$", text, re.MULTILINE)
    return f"PEP {int(match.group(1))}: {match.group(2).strip()}" if match else "PEP"


def _pages_of(pep: Path, scratch: Path) -> list[tuple[str, str, int]]:
    """(slug, text, chunks) of each page of one PEP, in reading order."""
    text = pep.read_text(encoding="utf-8")
    pep_title = _pep_title(text)
    pages = []

    def add(section: Section, trail: list[str]) -> None:
        title = " / ".join([pep_title, *trail, section.title])
        page = _render(section, title)
        chunks = _chunk_count(page, scratch)
        if chunks > MAX_CHUNKS_PER_PAGE and section.children:
            # The section's own text is a page; each subsection is another.
            add(Section(section.level, section.title, section.lines, []), trail)
            for child in section.children:
                add(child, [*trail, section.title])
            return
        if any(line.strip() for line in section.lines) or section.children:
            pages.append((" ".join([*trail, section.title]), page, chunks))

    for section in _sections(text)[1:]:
        if section.title.lower() not in _SKIPPED_SECTIONS:
            add(section, [])
    return pages


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60] or "page"


def build_pages(count: int = PAGES, peps: Path = PEPS, scratch_dir: Path | None = None) -> list[Page]:
    """`count` pages, spread evenly over every PEP's pages (in file order), with their chunk counts
    under the project's default chunking."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="doc-site-") as temporary:
        scratch = Path(scratch_dir or temporary) / "page.rst"
        every: list[Page] = []
        for pep in sorted(peps.glob("*.rst")):
            for number, (title, text, chunks) in enumerate(_pages_of(pep, scratch), start=1):
                every.append(Page(f"{pep.stem}/{number:02d}-{_slug(title)}.rst", text, chunks))
    if len(every) < count:
        raise ValueError(f"the corpus in {peps} makes {len(every)} pages, fewer than {count}")
    # Evenly spread: the i-th kept page is the floor(i * len / count)-th, so every PEP contributes.
    return [every[index * len(every) // count] for index in range(count)]


def write_pages(pages: list[Page], sources: Path) -> None:
    for page in pages:
        path = sources / page.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page.text, encoding="utf-8")


def revise(text: str) -> str:
    """The page with the last line of every paragraph, list and code block edited (a few words
    appended), so that each of its chunks changes and misses the response cache. Headings, tables
    and directives are left alone: the page keeps its structure."""
    lines = text.split("\n")
    out = []
    for index, line in enumerate(lines):
        following = lines[index + 1] if index + 1 < len(lines) else ""
        stripped = line.strip()
        markup = (
            _ADORNMENT.match(line)
            or _ADORNMENT.match(following)
            or stripped.endswith("::")
            or stripped.startswith((".. ", "+", "|"))
            or set(stripped) <= set("=- ")
        )
        if stripped and not following.strip() and not markup:
            line = line.rstrip() + _REVISION
        out.append(line)
    return "\n".join(out)


def revise_pages(pages: list[Page], sources: Path, every: int = 6) -> list[Page]:
    """Edits every `every`-th page in place (the first, the seventh, ...); the pages changed."""
    changed = pages[::every]
    for page in changed:
        path = sources / page.key
        path.write_text(revise(path.read_text(encoding="utf-8")), encoding="utf-8")
    return changed


if __name__ == "__main__":
    from collections import Counter

    built = build_pages()
    histogram = Counter(page.chunks for page in built)
    print(f"{len(built)} pages, {sum(page.chunks for page in built)} chunks; pages by chunks: "
          + ", ".join(f"{chunks}: {n}" for chunks, n in sorted(histogram.items())))
