"""Finding and reading source documents: what a user sees for good files and for bad ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import unquote

import pytest

from qa_pipeline.core.documents import (
    SUPPORTED_SUFFIXES,
    DocumentError,
    DocumentFormat,
    discover_documents,
    read_document,
)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def source_for(sources: Path, key: str):
    return next(source for source in discover_documents(sources) if source.key == key)


def test_discovery_lists_files_recursively_with_posix_keys_sizes_and_hashes(tmp_path):
    write(tmp_path / "intro.md", "# Intro\n\nHello.\n")
    write(tmp_path / "guides" / "install" / "linux.rst", "Linux\n=====\n\nRun it.\n")

    found = discover_documents(tmp_path)

    assert [source.key for source in found] == ["guides/install/linux.rst", "intro.md"]
    linux = found[0]
    assert linux.path == tmp_path / "guides" / "install" / "linux.rst"
    assert linux.size == linux.path.stat().st_size
    assert linux.content_hash == hashlib.sha256(linux.path.read_bytes()).hexdigest()
    assert linux.suffix == ".rst"


def test_discovery_skips_hidden_files_and_folders(tmp_path):
    write(tmp_path / "visible.txt", "text")
    write(tmp_path / ".DS_Store", b"\x00\x01")
    write(tmp_path / ".git" / "config", "[core]")
    write(tmp_path / "docs" / ".cache" / "page.md", "# cached")

    assert [source.key for source in discover_documents(tmp_path)] == ["visible.txt"]


def test_discovery_of_a_missing_folder_says_which_folder(tmp_path):
    with pytest.raises(DocumentError, match="missing-sources"):
        discover_documents(tmp_path / "missing-sources")


def test_content_hash_changes_when_the_file_changes(tmp_path):
    path = write(tmp_path / "a.md", "first version")
    before = discover_documents(tmp_path)[0].content_hash
    path.write_text("second version", encoding="utf-8")
    assert discover_documents(tmp_path)[0].content_hash != before


def test_names_with_spaces_and_non_ascii_characters_work(tmp_path):
    write(tmp_path / "Benutzerhandbuch" / "Über uns – FAQ.md", "# Über uns\n\nWir sind ein Team.\n")

    source = discover_documents(tmp_path)[0]
    document = read_document(source)

    assert source.key == "Benutzerhandbuch/Über uns – FAQ.md"
    assert document.key == source.key
    assert "Wir sind ein Team." in document.text


def test_names_dagster_would_reject_get_reversible_escaped_keys(tmp_path):
    names = ["wait... what.md", "tab\there.md", "line\nbreak.md", "100%25 sure.md", "50% off.md"]
    for name in names:
        write(tmp_path / name, "content")

    keys = [source.key for source in discover_documents(tmp_path)]

    assert len(set(keys)) == len(names)
    for key in keys:
        assert "..." not in key
        assert not any(ord(char) < 32 for char in key)
    assert sorted(unquote(key) for key in keys) == sorted(names)
    assert "50% off.md" in keys  # names that need no escaping keep their plain form


def test_unsupported_types_are_listed_and_reading_one_names_the_file(tmp_path):
    write(tmp_path / "notes.docx.bak", "text")
    write(tmp_path / "README", "text")

    found = {source.key: source for source in discover_documents(tmp_path)}

    assert not found["notes.docx.bak"].supported
    for source in found.values():
        with pytest.raises(DocumentError) as error:
            read_document(source)
        message = str(error.value)
        assert str(source.path) in message
        assert "unsupported file type" in message
        assert all(suffix in message for suffix in SUPPORTED_SUFFIXES)


def test_suffixes_are_matched_case_insensitively(tmp_path):
    write(tmp_path / "GUIDE.MD", "# Title\n\nBody.\n")
    document = read_document(discover_documents(tmp_path)[0])
    assert document.format is DocumentFormat.MARKDOWN


@pytest.mark.parametrize("content", [b"", b"  \n\n\t \n"])
def test_empty_files_are_rejected_naming_the_file(tmp_path, content):
    path = write(tmp_path / "empty notes.md", content)
    with pytest.raises(DocumentError, match="empty|only whitespace") as error:
        read_document(path)
    assert str(path) in str(error.value)


def test_binary_files_are_rejected_naming_the_file(tmp_path):
    path = write(tmp_path / "image.txt", b"GIF89a\x01\x00\x01\x00\x00\xff\xff\xff")
    with pytest.raises(DocumentError, match="binary") as error:
        read_document(path)
    assert str(path) in str(error.value)


def test_text_full_of_control_characters_is_rejected_as_binary(tmp_path):
    path = write(tmp_path / "dump.md", bytes(range(1, 9)) * 200 + b"some text")
    with pytest.raises(DocumentError, match="binary"):
        read_document(path)


def test_a_pdf_renamed_to_txt_is_called_a_pdf(tmp_path):
    path = write(tmp_path / "manual.txt", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")
    with pytest.raises(DocumentError, match="PDF") as error:
        read_document(path)
    assert str(path) in str(error.value)


def test_non_utf8_text_names_the_byte_offset_and_accepts_a_bom(tmp_path):
    path = write(tmp_path / "latin1.md", "# Café\n\nNaïve text.\n".encode("latin-1"))
    with pytest.raises(DocumentError) as error:
        read_document(path)
    message = str(error.value)
    assert str(path) in message
    assert "not valid UTF-8" in message
    assert "byte offset 5" in message  # "# Caf" is five bytes, then 0xE9
    assert "line 1" in message
    assert "byte-order mark is fine" in message


def test_utf8_with_a_byte_order_mark_is_read_without_it(tmp_path):
    path = write(tmp_path / "bom.md", b"\xef\xbb\xbf# Title\n\nBody.\n")
    assert read_document(path).text.startswith("# Title")


def test_utf16_files_are_rejected_with_advice(tmp_path):
    path = write(tmp_path / "windows.txt", "Hello".encode("utf-16"))
    with pytest.raises(DocumentError, match="UTF-16"):
        read_document(path)


def test_windows_line_endings_are_normalised(tmp_path):
    path = write(tmp_path / "crlf.txt", b"one\r\ntwo\r\n\r\nthree\r\n")
    assert read_document(path).text == "one\ntwo\n\nthree\n"


# --- pre-chunked JSONL ----------------------------------------------------------------


def jsonl(*lines: object) -> str:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"


def test_prechunked_jsonl_keeps_content_and_metadata_including_repeated_ids(tmp_path):
    path = write(
        tmp_path / "export.jsonl",
        jsonl(
            {"content": "Invoices are sent monthly.", "metadata": {"service": "billing", "chunk_id": 7}},
            {"content": "Refunds take 5 days.", "metadata": {"service": "billing", "chunk_id": 7}},
            {"content": "Login uses SSO.", "service": "auth", "metadata": {"doc_type": "faq"}},
        ),
    )

    document = read_document(path)

    assert document.format is DocumentFormat.JSONL
    assert [record.content for record in document.records] == [
        "Invoices are sent monthly.",
        "Refunds take 5 days.",
        "Login uses SSO.",
    ]
    assert document.records[1].metadata == {"service": "billing", "chunk_id": 7}
    assert document.records[2].metadata == {"service": "auth", "doc_type": "faq"}
    assert document.skipped_lines == ()
    assert len(document.warnings) == 1
    assert "line 2: chunk_id '7' also on line 1" in document.warnings[0]


def test_one_malformed_jsonl_line_is_skipped_with_its_line_number_and_the_rest_kept(tmp_path):
    path = write(
        tmp_path / "big export.jsonl",
        jsonl(
            {"content": "first"},
            '{"content": "broken", ',
            {"content": "third"},
            "",
            {"metadata": {"service": "x"}},
            {"content": 42},
            ["not", "an", "object"],
            {"content": "last"},
        ),
    )

    document = read_document(path)

    assert [record.content for record in document.records] == ["first", "third", "last"]
    assert [record.line_number for record in document.records] == [1, 3, 8]
    problems = {problem.line_number: problem.reason for problem in document.skipped_lines}
    assert set(problems) == {2, 5, 6, 7}
    assert "not valid JSON" in problems[2]
    assert 'no "content"' in problems[5]
    assert "not a string" in problems[6]
    assert "not an object" in problems[7]
    assert document.warnings[0].startswith("line 2: not valid JSON")


def test_jsonl_without_any_valid_record_fails_naming_file_and_lines(tmp_path):
    path = write(tmp_path / "bad.jsonl", jsonl('{"content": ', {"text": "wrong field name"}))
    with pytest.raises(DocumentError) as error:
        read_document(path)
    message = str(error.value)
    assert str(path) in message
    assert "line 1:" in message and "line 2:" in message
    assert '"content"' in message


def test_a_jsonl_line_that_is_not_utf8_is_skipped_not_fatal(tmp_path):
    path = write(tmp_path / "mixed.jsonl", b'{"content": "ok"}\n{"content": "caf\xe9"}\n{"content": "fine"}\n')
    document = read_document(path)
    assert [record.content for record in document.records] == ["ok", "fine"]
    assert document.skipped_lines[0].line_number == 2
    assert "UTF-8" in document.skipped_lines[0].reason


# --- HTML -----------------------------------------------------------------------------


def test_html_becomes_markdown_with_headings_paragraphs_code_and_tables(tmp_path):
    path = write(
        tmp_path / "page.html",
        """<!doctype html><html><head><title>Ignored title</title>
        <style>body { color: red }</style><script>var x = "<p>not text</p>";</script></head>
        <body><h1>User Guide</h1><p>Welcome to   the <b>guide</b>.</p>
        <h2>Install</h2><p>Run this:</p>
        <pre><code class="language-bash">pip install tool
tool --version</code></pre>
        <h3>Options</h3>
        <table><tr><th>Flag</th><th>Meaning</th></tr>
        <tr><td>-v</td><td>verbose</td></tr><tr><td>-q</td><td>quiet &amp; calm</td></tr></table>
        <ul><li>first item</li><li>second item</li></ul>
        </body></html>""",
    )

    text = read_document(path).text

    assert "# User Guide\n\nWelcome to the guide." in text
    assert "## Install" in text
    assert "### Options" in text
    assert "```bash\npip install tool\ntool --version\n```" in text
    assert "| Flag | Meaning |\n| --- | --- |\n| -v | verbose |\n| -q | quiet & calm |" in text
    assert "- first item" in text and "- second item" in text
    assert "Ignored title" not in text and "color: red" not in text and "not text" not in text


def test_html_with_no_visible_text_is_rejected(tmp_path):
    path = write(tmp_path / "blank.htm", "<html><head><script>go()</script></head><body> </body></html>")
    with pytest.raises(DocumentError, match="no text") as error:
        read_document(path)
    assert str(path) in str(error.value)


REPO = Path(__file__).resolve().parents[1]
# The full PEP corpus sits in shared/ beside the repository; the repository ships six of them.
PEP_CORPUS = next(
    folder for folder in (REPO.parent / "shared" / "corpus" / "peps", REPO / "data" / "sources") if folder.is_dir()
)


def test_the_pep_corpus_reads_without_error():
    sources = discover_documents(PEP_CORPUS)
    assert len(sources) >= 6
    for source in sources:
        assert read_document(source).text.strip()
