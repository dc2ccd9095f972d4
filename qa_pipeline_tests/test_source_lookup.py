"""A document's file is found from its partition key alone, and unchanged files are not read again."""

from __future__ import annotations

import os
import time
from pathlib import Path

from qa_pipeline.core.documents import discover_documents, find_document
from qa_pipeline.core.layout import DataLayout


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _odd_folder(tmp_path: Path) -> Path:
    sources = tmp_path / "sources"
    for name in ["intro.md", "guides/install/linux.rst", "wait... what.md", "tab\there.md", "100%25 sure.md",
                 "50% off.md", "Benutzerhandbuch/Über uns – FAQ.md", ".hidden.md", "docs/.cache/page.md"]:
        _write(sources / name, f"# {name}\n\ntext of {name}\n")
    outside = _write(tmp_path / "outside" / "secret.md", "# secret\n")
    (sources / "secret.md").symlink_to(outside)
    (sources / "inside-link.md").symlink_to(Path("intro.md"))
    (sources / "linked-guides").symlink_to(sources / "guides", target_is_directory=True)
    return sources


def test_every_discovered_document_is_found_by_its_key_alone_and_nothing_else_is(tmp_path):
    sources = _odd_folder(tmp_path)

    discovered = {source.key: source for source in discover_documents(sources)}

    for key, source in discovered.items():
        found = find_document(sources, key)
        assert found == source, key
    for key in ["secret.md", ".hidden.md", "docs/.cache/page.md", "linked-guides/install/linux.rst",
                "../outside/secret.md", "missing.md", "guides", "wait%2E%2E%2E what.md/../intro.md"]:
        assert find_document(sources, key) is None, key
    assert find_document(sources, "secret.md", follow_external_symlinks=True) is not None


def test_a_rediscovered_folder_reports_edits_even_when_size_and_modification_time_are_kept(tmp_path):
    layout = DataLayout(root=tmp_path / "data")
    layout.root.mkdir()
    page = _write(layout.sources_dir / "page.md", "# Page\n\nversion one\n")
    time.sleep(0.6)  # a file changed in the last half second is hashed again on every discovery
    first = {source.key: source.content_hash for source in layout.discover_sources()}
    assert layout.source_stamps_file.exists()

    stamp = page.stat()
    page.write_text("# Page\n\nversion two\n", encoding="utf-8")  # same size
    os.utime(page, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert page.stat().st_size == stamp.st_size

    second = {source.key: source.content_hash for source in layout.discover_sources()}
    assert second["page.md"] != first["page.md"]
    assert second == {source.key: source.content_hash for source in discover_documents(layout.sources_dir)}


def test_a_removed_file_leaves_the_recorded_stamps_and_a_lost_stamp_file_only_costs_a_rehash(tmp_path):
    layout = DataLayout(root=tmp_path / "data")
    layout.root.mkdir()
    for name in ("a.md", "b.md"):
        _write(layout.sources_dir / name, f"# {name}\n")
    expected = {source.key: source.content_hash for source in discover_documents(layout.sources_dir)}
    assert {s.key: s.content_hash for s in layout.discover_sources()} == expected

    (layout.sources_dir / "b.md").unlink()
    assert [s.key for s in layout.discover_sources()] == ["a.md"]

    layout.source_stamps_file.write_bytes(b"not parquet")
    assert {s.key: s.content_hash for s in layout.discover_sources()} == {"a.md": expected["a.md"]}
