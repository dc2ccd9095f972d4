"""Chunking: heading paths, whole code blocks and tables, size bounds, overlap and stable ids."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import polars as pl
import pytest

from qa_pipeline.core.chunking import CHUNK_SCHEMA, Chunk, chunk_document, chunks_to_frame, count_tokens
from qa_pipeline.core.documents import discover_documents, read_document

REPO = Path(__file__).resolve().parents[1]
PEP_CORPUS = next(
    folder for folder in (REPO.parent / "shared" / "corpus" / "peps", REPO / "data" / "sources") if folder.is_dir()
)


def chunks_of(tmp_path: Path, name: str, text: str, **options) -> list[Chunk]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return chunk_document(read_document(path), **options)


def sentence(number: int) -> str:
    return f"Sentence number {number} explains one more detail about the billing service."


def prose(paragraphs: int, sentences_each: int = 6, start: int = 0) -> str:
    counter = iter(range(start, start + paragraphs * sentences_each))
    return "\n\n".join(" ".join(sentence(next(counter)) for _ in range(sentences_each)) for _ in range(paragraphs))


# --- token counting -------------------------------------------------------------------


def test_token_count_approximates_bpe_for_words_punctuation_and_long_words():
    assert count_tokens("") == 0
    assert count_tokens("The cat sat.") == 4
    assert count_tokens("internationalization") == 5  # long words: about one token per 4 characters
    assert count_tokens("a ------------------------ b") == 5  # a ruler is a few tokens, not 24
    assert count_tokens("日本語") == 3


def test_token_counts_add_up_over_whitespace():
    left, right = "def f(x):\n    return x ** 2", "Hello, world -- again!"
    assert count_tokens(left + "\n\n" + right) == count_tokens(left) + count_tokens(right)


# --- heading paths --------------------------------------------------------------------


def test_markdown_headings_become_nested_heading_paths(tmp_path):
    chunks = chunks_of(
        tmp_path,
        "guide.md",
        "Preamble text.\n\n# Guide\n\nIntro.\n\n## Install\n\nSteps.\n\n### On Linux ###\n\nUse apt.\n\n"
        "## Configure\n\nEdit the file.\n\nSetext title\n------------\n\nUnder setext.\n\n# Appendix\n\nMore.\n",
    )

    assert [(chunk.heading_path, chunk.content) for chunk in chunks] == [
        ([], "Preamble text."),
        (["Guide"], "Intro."),
        (["Guide", "Install"], "Steps."),
        (["Guide", "Install", "On Linux"], "Use apt."),
        (["Guide", "Configure"], "Edit the file."),
        (["Guide", "Setext title"], "Under setext."),
        (["Appendix"], "More."),
    ]


def test_rst_title_styles_become_levels_in_order_of_first_use(tmp_path):
    chunks = chunks_of(
        tmp_path,
        "spec.rst",
        "=============\n Document Title\n=============\n\nAbstract text.\n\n"
        "Specification\n=============\n\nSpec text.\n\n"
        "Syntax\n------\n\nSyntax text.\n\n"
        "Tokens\n~~~~~~\n\nToken text.\n\n"
        "Semantics\n---------\n\nSemantics text.\n\n"
        "References\n==========\n\nRef text.\n",
    )

    assert [(chunk.heading_path, chunk.content) for chunk in chunks] == [
        (["Document Title"], "Abstract text."),
        (["Document Title", "Specification"], "Spec text."),
        (["Document Title", "Specification", "Syntax"], "Syntax text."),
        (["Document Title", "Specification", "Syntax", "Tokens"], "Token text."),
        (["Document Title", "Specification", "Semantics"], "Semantics text."),
        (["Document Title", "References"], "Ref text."),
    ]


def test_rst_comments_and_transitions_are_not_content(tmp_path):
    chunks = chunks_of(
        tmp_path,
        "notes.rst",
        "Title\n=====\n\nBody.\n\n----------\n\nAfter the transition.\n\n"
        "..\n   Local Variables:\n   mode: indented-text\n   End:\n",
    )
    assert [chunk.content for chunk in chunks] == ["Body.\n\nAfter the transition."]


def test_html_headings_become_heading_paths(tmp_path):
    chunks = chunks_of(
        tmp_path,
        "page.html",
        "<h1>Manual</h1><p>Start.</p><h2>Setup</h2><p>Install it.</p><h3>Proxy</h3><p>Set it.</p>"
        "<h2>Usage</h2><p>Run it.</p>",
    )
    assert [(chunk.heading_path, chunk.content) for chunk in chunks] == [
        (["Manual"], "Start."),
        (["Manual", "Setup"], "Install it."),
        (["Manual", "Setup", "Proxy"], "Set it."),
        (["Manual", "Usage"], "Run it."),
    ]


DOCS_SITE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Configuring the cache | Acme Docs</title>
<link rel="stylesheet" href="/assets/site.css"><script src="/assets/search.js"></script></head>
<body>
<a class="skip-link" href="#content">Skip to content</a>
<header class="site-header">
  <a class="logo" href="/"><img src="/logo.svg" alt="Acme Docs home"></a>
  <nav class="top-menu"><ul>
    <li><a href="/">Home</a></li><li><a href="/guides/">Guides</a></li>
    <li><a href="/api/">API reference</a></li><li><a href="https://github.com/acme/acme">GitHub</a></li>
  </ul></nav>
  <nav aria-label="breadcrumbs"><ol>
    <li><a href="/">Docs</a></li><li><a href="/guides/">Operator guides</a></li><li>Configuring the cache</li>
  </ol></nav>
  <form role="search"><input type="search" placeholder="Search the docs"></form>
</header>
<div class="announcement">Acme 4.0 is out: read the migration notes.</div>
<div class="layout">
  <aside class="sidebar"><h2>Operator guides</h2><ul>
    <li><a href="/guides/install/">Installing Acme on Kubernetes</a></li>
    <li><a href="/guides/cache/">Configuring the cache</a></li>
    <li><a href="/guides/upgrade/">Upgrading between major versions</a></li>
  </ul></aside>
  <main id="content">
    <article>
      <header><h1>Configuring the cache</h1><p class="meta">Applies to Acme 3.2 and later.</p></header>
      <p>The result cache keeps rendered reports in memory so that repeated queries return at once.</p>
      <h2>Eviction</h2>
      <p>Entries are evicted least recently used first when the cache exceeds its memory limit.</p>
      <pre><code class="language-yaml">cache:
  max_memory_mb: 512</code></pre>
      <div class="sidebar-toc" role="complementary"><p>On this page: Eviction, Persistence</p></div>
      <h2>Persistence</h2>
      <p>Set persist to true to write the cache to disk on shutdown and reload it on start.</p>
    </article>
    <nav class="pager"><a href="/guides/install/">Previous: Installing Acme</a>
      <a href="/guides/upgrade/">Next: Upgrading</a></nav>
  </main>
</div>
<footer class="site-footer"><p>&copy; 2024 Acme Corporation. All rights reserved.</p>
  <a href="/privacy/">Privacy policy</a> <a href="/status/">System status</a></footer>
</body></html>
"""


def test_a_documentation_page_gives_chunks_of_its_article_without_menus_sidebars_or_footer(tmp_path):
    chunks = chunks_of(tmp_path, "cache.html", DOCS_SITE_PAGE)

    assert [(chunk.heading_path, chunk.content) for chunk in chunks] == [
        (
            ["Configuring the cache"],
            "Applies to Acme 3.2 and later.\n\nThe result cache keeps rendered reports in memory so that "
            "repeated queries return at once.",
        ),
        (
            ["Configuring the cache", "Eviction"],
            "Entries are evicted least recently used first when the cache exceeds its memory limit.\n\n"
            "```yaml\ncache:\n  max_memory_mb: 512\n```",
        ),
        (
            ["Configuring the cache", "Persistence"],
            "Set persist to true to write the cache to disk on shutdown and reload it on start.",
        ),
    ]
    everything = "\n".join(chunk.content + " ".join(chunk.heading_path) for chunk in chunks)
    for furniture in (
        "Skip to content", "Home", "API reference", "GitHub", "Operator guides", "Search the docs",
        "Acme 4.0 is out", "Installing Acme", "Upgrading", "On this page", "Previous", "Next",
        "2024 Acme Corporation", "All rights reserved", "Privacy policy", "System status",
    ):  # fmt: skip
        assert furniture not in everything


def test_a_page_without_main_content_keeps_its_text_but_not_its_menus_or_footer(tmp_path):
    chunks = chunks_of(
        tmp_path,
        "plain.html",
        '<body><div role="banner">Acme Docs</div><div role="navigation"><div><a href="/">Home</a></div>'
        "<div><a href=\"/faq/\">FAQ</a></div></div>"
        "<h1>Release notes</h1><p>Version 3.2 adds a result cache.</p>"
        '<div role="contentinfo">Copyright Acme</div><p>Version 3.1 fixed the exporter.</p></body>',
    )

    assert [(chunk.heading_path, chunk.content) for chunk in chunks] == [
        (["Release notes"], "Version 3.2 adds a result cache.\n\nVersion 3.1 fixed the exporter."),
    ]


def test_heading_lookalikes_inside_code_are_code_not_headings(tmp_path):
    markdown = chunks_of(tmp_path, "a.md", "# Setup\n\n```bash\n# install first\npip install tool\n```\n")
    rst = chunks_of(tmp_path, "b.rst", "Setup\n=====\n\nOutput::\n\n    Report\n    ======\n    all good\n")

    assert [chunk.heading_path for chunk in markdown] == [["Setup"]]
    assert "# install first\npip install tool" in markdown[0].content
    assert [chunk.heading_path for chunk in rst] == [["Setup"]]
    assert "    Report\n    ======\n    all good" in rst[0].content


def test_a_fenced_block_inside_a_list_item_stays_whole(tmp_path):
    code = "    ```bash\n    ./configure\n\n    make install\n    ```"
    chunks = chunks_of(tmp_path, "list.md", f"# Install\n\n1. Build it:\n\n{code}\n\n2. Run it.\n")
    assert sum(code in chunk.content for chunk in chunks) == 1


def test_a_chunk_never_spans_two_sections_even_when_they_are_short(tmp_path):
    chunks = chunks_of(tmp_path, "short.md", "# A\n\nTiny.\n\n# B\n\nAlso tiny.\n")
    assert [chunk.content for chunk in chunks] == ["Tiny.", "Also tiny."]


def test_plain_text_is_chunked_by_paragraphs(tmp_path):
    chunks = chunks_of(tmp_path, "notes.txt", prose(12), target_tokens=100, overlap_tokens=0)
    paragraphs = prose(12).split("\n\n")
    assert all(chunk.heading_path == [] for chunk in chunks)
    assert "\n\n".join(chunk.content for chunk in chunks) == "\n\n".join(paragraphs)


# --- code blocks and tables -----------------------------------------------------------


def code_lines(count: int) -> list[str]:
    return [f"    result_{n} = compute(value_{n}, factor={n})  # step {n}" for n in range(count)]


def test_a_code_block_that_fits_stays_whole_in_one_chunk(tmp_path):
    code = "```python\n" + "\n".join(code_lines(20)) + "\n```"
    chunks = chunks_of(tmp_path, "doc.md", f"# Code\n\n{prose(3)}\n\n{code}\n\n{prose(3, start=50)}\n")
    assert sum(code in chunk.content for chunk in chunks) == 1


def test_a_code_block_larger_than_the_maximum_is_split_only_between_lines(tmp_path):
    lines = code_lines(300)
    text = "# Code\n\n```python\n" + "\n".join(lines) + "\n```\n"
    chunks = chunks_of(tmp_path, "doc.md", text, target_tokens=200)

    assert len(chunks) > 3
    seen: list[str] = []
    for chunk in chunks:
        assert chunk.n_tokens <= 400
        body = chunk.content.split("\n")
        # Every piece is still a fenced block of the same language.
        assert body[0] == "```python" and body[-1] == "```"
        for line in body[1:-1]:
            assert line in lines  # whole lines only
        fresh = [line for line in body[1:-1] if line not in seen]
        seen.extend(fresh)
    assert seen == lines  # nothing lost, order kept


def test_rst_literal_blocks_and_code_block_directives_stay_whole(tmp_path):
    literal = "\n".join(code_lines(15))
    directive = ".. code-block:: python\n   :linenos:\n\n" + "\n".join(code_lines(15)).replace("    ", "   ", 1)
    text = f"Usage\n=====\n\n{prose(2)}\n\nFor example::\n\n{literal}\n\n{prose(2, start=30)}\n\n{directive}\n\nDone.\n"
    chunks = chunks_of(tmp_path, "doc.rst", text, target_tokens=150)
    assert sum(literal in chunk.content for chunk in chunks) == 1
    assert sum(directive in chunk.content for chunk in chunks) == 1


def test_a_long_markdown_table_is_split_between_rows_with_the_header_repeated(tmp_path):
    header = "| Setting | Default | Meaning |\n| --- | --- | --- |"
    rows = [f"| option_{n} | {n} | what option {n} changes in the service |" for n in range(200)]
    text = "# Settings\n\n" + header + "\n" + "\n".join(rows) + "\n"
    chunks = chunks_of(tmp_path, "table.md", text, target_tokens=200)

    assert len(chunks) > 2
    for chunk in chunks:
        assert chunk.content.startswith(header + "\n")
        for line in chunk.content.split("\n")[2:]:
            assert line in rows


def test_rst_grid_and_simple_tables_are_kept_whole_when_they_fit(tmp_path):
    grid = (
        "+----------+-------------+\n| Operator | Description |\n+==========+=============+\n"
        "| ``or``   | Boolean OR  |\n+----------+-------------+\n"
        "| ``and``  | Boolean AND |\n+----------+-------------+"
    )
    simple = "=====  =====\nInput  Output\n=====  =====\nTrue   False\nFalse  True\n=====  ====="
    chunks = chunks_of(tmp_path, "tables.rst", f"Tables\n======\n\n{grid}\n\nText between.\n\n{simple}\n")
    assert len(chunks) == 1
    assert grid in chunks[0].content and simple in chunks[0].content


def test_a_long_grid_table_is_split_between_rows(tmp_path):
    border = "+------------+------------------------------------------+"
    header = f"{border}\n| Name       | Description                              |\n" + border.replace("-", "=")
    rows = [
        f"| name_{n:<5} | description of item {n:<5} spans      |\n"
        f"| {'':10} | two lines of the table                   |\n{border}"
        for n in range(80)
    ]
    text = "Items\n=====\n\n" + header + "\n" + "\n".join(rows) + "\n"
    chunks = chunks_of(tmp_path, "grid.rst", text, target_tokens=150)

    assert len(chunks) > 2
    for chunk in chunks:
        assert chunk.content.startswith(header + "\n")
        body = chunk.content[len(header) + 1 :]
        # Each chunk holds a run of whole rows: both lines of each row and its closing border.
        assert body.startswith("| name_") and body.endswith(border)
        assert f"\n{body}\n" in "\n" + "\n".join(rows) + "\n"


# --- sizes ----------------------------------------------------------------------------


def test_no_chunk_exceeds_the_maximum_and_most_are_near_the_target(tmp_path):
    text = "# Billing\n\n" + prose(60) + "\n\n## Details\n\n" + prose(60, start=1000)
    chunks = chunks_of(tmp_path, "long.md", text, target_tokens=300, overlap_tokens=40, max_tokens=450)

    assert all(chunk.n_tokens <= 450 for chunk in chunks)
    assert all(chunk.n_tokens == count_tokens(chunk.content) for chunk in chunks)
    near_target = [chunk for chunk in chunks if 150 <= chunk.n_tokens <= 450]
    assert len(near_target) >= 0.8 * len(chunks)


def test_the_default_maximum_is_twice_the_target(tmp_path):
    giant_paragraph = " ".join(sentence(number) for number in range(400))
    chunks = chunks_of(tmp_path, "wall.txt", giant_paragraph, target_tokens=100)
    assert max(chunk.n_tokens for chunk in chunks) <= 200


def test_a_long_paragraph_is_split_at_sentence_ends(tmp_path):
    sentences = [sentence(number) for number in range(300)]
    chunks = chunks_of(tmp_path, "wall.txt", " ".join(sentences), target_tokens=120, overlap_tokens=20)

    assert len(chunks) > 5
    for chunk in chunks:
        assert chunk.n_tokens <= 240
        assert chunk.content.endswith(".")
        assert all(part + "." in sentences for part in chunk.content.rstrip(".").split(". "))


def test_a_sentence_without_punctuation_is_split_between_words(tmp_path):
    words = [f"word{number}" for number in range(3000)]
    chunks = chunks_of(tmp_path, "words.txt", " ".join(words), target_tokens=100, overlap_tokens=0)
    assert all(chunk.n_tokens <= 200 for chunk in chunks)
    assert [word for chunk in chunks for word in chunk.content.split()] == words


def test_even_a_huge_unbroken_string_respects_the_maximum(tmp_path):
    chunks = chunks_of(tmp_path, "blob.txt", "Data: " + "QUJD" * 5000, target_tokens=100, overlap_tokens=0)
    assert all(chunk.n_tokens <= 200 for chunk in chunks)
    assert "".join(chunk.content for chunk in chunks).replace("Data: ", "") == "QUJD" * 5000


@pytest.mark.parametrize(("target", "overlap", "maximum"), [(0, 0, None), (100, 100, None), (100, 10, 50)])
def test_impossible_sizes_are_refused(tmp_path, target, overlap, maximum):
    with pytest.raises(ValueError, match="target_tokens"):
        chunks_of(tmp_path, "a.txt", "text", target_tokens=target, overlap_tokens=overlap, max_tokens=maximum)


# --- overlap --------------------------------------------------------------------------


def test_the_next_chunk_in_a_section_starts_with_the_last_sentences_of_the_previous(tmp_path):
    chunks = chunks_of(tmp_path, "doc.md", "# Billing\n\n" + prose(20), target_tokens=150, overlap_tokens=30)

    assert len(chunks) > 3
    for previous, following in zip(chunks, chunks[1:]):
        shared = _shared_prefix_suffix(previous.content, following.content)
        assert shared, "no overlap between consecutive chunks"
        assert 0 < count_tokens(shared) <= 30
        assert shared.startswith("Sentence number")  # whole sentences only


def test_no_overlap_is_added_across_sections_or_when_disabled(tmp_path):
    across = chunks_of(tmp_path, "a.md", "# One\n\n" + prose(1) + "\n\n# Two\n\n" + prose(1, start=100))
    assert not _shared_prefix_suffix(across[0].content, across[1].content)

    disabled = chunks_of(tmp_path, "b.md", "# One\n\n" + prose(20), target_tokens=150, overlap_tokens=0)
    assert "\n\n".join(chunk.content for chunk in disabled) == prose(20)


def _shared_prefix_suffix(previous: str, following: str) -> str:
    """The longest end of `previous` that `following` starts with."""
    for start in range(len(previous)):
        if following.startswith(previous[start:]):
            return previous[start:]
    return ""


# --- ids and records ------------------------------------------------------------------


def test_chunk_ids_are_unique_stable_and_follow_the_content(tmp_path):
    text = "# A\n\n" + prose(30)
    first = chunks_of(tmp_path, "doc.md", text, target_tokens=120)
    again = chunks_of(tmp_path, "doc.md", text, target_tokens=120)
    changed = chunks_of(tmp_path, "doc.md", text.replace("number 150 ", "number 15O "), target_tokens=120)

    ids = [chunk.chunk_id for chunk in first]
    assert len(set(ids)) == len(ids)
    assert ids == [chunk.chunk_id for chunk in again]
    assert [chunk.position for chunk in first] == list(range(len(first)))
    changed_positions = [index for index, (a, b) in enumerate(zip(first, changed)) if a.chunk_id != b.chunk_id]
    assert changed_positions and all("number 150 " in first[index].content for index in changed_positions)
    for chunk in first:
        assert chunk.content_hash == hashlib.sha256(chunk.content.encode()).hexdigest()[:16]
        expected = hashlib.sha256(f"{chunk.document}\0{chunk.position}\0{chunk.content_hash}".encode()).hexdigest()
        assert chunk.chunk_id == expected[:16]


def test_the_same_content_in_two_documents_gets_different_ids(tmp_path):
    first = chunks_of(tmp_path, "a.md", "Same text.")
    second = chunks_of(tmp_path, "b.md", "Same text.")
    assert first[0].content_hash == second[0].content_hash
    assert first[0].chunk_id != second[0].chunk_id


def test_prechunked_jsonl_passes_through_with_metadata_and_repeated_original_ids(tmp_path):
    records = [
        {"content": "Invoices are sent monthly.", "metadata": {"service": "billing", "doc_type": "faq",
         "chunk_id": "c1", "heading_hierarchy": ["Billing", "Invoices"], "source_file": "billing.md"}},
        {"content": "Invoices are sent monthly.", "metadata": {"service": "billing", "chunk_id": "c1",
         "heading_hierarchy": "Billing > Refunds"}},
        {"content": "Login uses SSO.", "service": "auth"},
    ]  # fmt: skip
    text = "\n".join(json.dumps(record) for record in records) + "\n"
    chunks = chunks_of(tmp_path, "export.jsonl", text, target_tokens=3, overlap_tokens=0)  # sizes do not apply

    assert [chunk.content for chunk in chunks] == [record["content"] for record in records]
    assert [chunk.service for chunk in chunks] == ["billing", "billing", "auth"]
    assert [chunk.doc_type for chunk in chunks] == ["faq", None, None]
    assert [chunk.source_chunk_id for chunk in chunks] == ["c1", "c1", None]
    assert [chunk.heading_path for chunk in chunks] == [["Billing", "Invoices"], ["Billing", "Refunds"], []]
    assert len({chunk.chunk_id for chunk in chunks}) == 3
    assert json.loads(chunks[0].metadata_json)["source_file"] == "billing.md"
    assert json.loads(chunks[2].metadata_json) == {"service": "auth"}


def test_ordinary_documents_have_no_service_and_empty_metadata(tmp_path):
    chunk = chunks_of(tmp_path, "a.md", "Text.")[0]
    assert (chunk.service, chunk.doc_type, chunk.source_chunk_id, chunk.metadata_json) == (None, None, None, "{}")
    assert chunk.to_record()["content"] == "Text."


def test_chunks_frame_has_the_schema_also_when_empty(tmp_path):
    frame = chunks_to_frame(chunks_of(tmp_path, "a.md", "# T\n\n" + prose(10), target_tokens=100))
    empty = chunks_to_frame([])

    assert frame.schema == pl.Schema(CHUNK_SCHEMA)
    assert empty.schema == pl.Schema(CHUNK_SCHEMA)
    assert empty.height == 0
    assert frame["heading_path"][0].to_list() == ["T"]


# --- real documents and speed ---------------------------------------------------------


def test_the_pep_corpus_chunks_quickly_within_bounds():
    started = time.perf_counter()
    documents = [read_document(source) for source in discover_documents(PEP_CORPUS)]
    chunks = [chunk for document in documents for chunk in chunk_document(document)]
    elapsed = time.perf_counter() - started

    assert elapsed < 5
    assert chunks
    assert all(0 < chunk.n_tokens <= 800 for chunk in chunks)
    assert len({chunk.chunk_id for chunk in chunks}) == len(chunks)
    assert sum(bool(chunk.heading_path) for chunk in chunks) > 0.8 * len(chunks)
    # reStructuredText comments such as the Emacs footer never reach a chunk
    assert not any("Local Variables:" in chunk.content for chunk in chunks)


def test_a_large_document_chunks_in_linear_time(tmp_path):
    section = "## Part {n}\n\n" + prose(8) + "\n\n```python\n" + "\n".join(code_lines(30)) + "\n```\n\n"
    text = "# Big manual\n\n" + "".join(section.format(n=number) for number in range(450))
    assert len(text) > 2_000_000
    (tmp_path / "big.md").write_text(text, encoding="utf-8")

    started = time.perf_counter()
    chunks = chunk_document(read_document(tmp_path / "big.md"))
    elapsed = time.perf_counter() - started

    assert elapsed < 8  # about 1 s here; a quadratic step would take minutes
    assert all(chunk.n_tokens <= 800 for chunk in chunks)
    assert re.search(r"Part 449", " ".join(" ".join(chunk.heading_path) for chunk in chunks[-3:]))
