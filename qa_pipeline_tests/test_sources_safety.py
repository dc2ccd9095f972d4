"""Symbolic links in the sources folder never make the pipeline read (and send to the LLM) files outside it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qa_pipeline.core.documents import DocumentError, discover_documents, read_document
from qa_pipeline.core.settings import StorageSettings
from qa_pipeline_tests.conftest import cli_env, run_cli, sql

SECRET = "root:x:0:0:the-secret-password-line"
SECRET_IN_FOLDER = "the private notes kept outside the sources folder"


def make_sources(data_dir: Path, outside: Path) -> dict[str, Path]:
    """A sources folder with a link to a secret file, a link to a folder outside, and a link that stays inside."""
    sources = data_dir / "sources"
    outside.mkdir()
    secret = outside / "passwd.md"
    secret.write_text(f"# Accounts\n\n{SECRET}\n")
    private = outside / "private"
    private.mkdir()
    (private / "notes.md").write_text(f"# Notes\n\n{SECRET_IN_FOLDER}.\n")

    (sources / "guide.md").write_text("# Guide\n\nThe guide explains how to rotate the service keys every month.\n")
    (sources / "shared").mkdir()
    (sources / "shared" / "faq.md").write_text("# FAQ\n\nThe backup runs every night at two o'clock.\n")
    (sources / "faq-link.md").symlink_to(Path("shared") / "faq.md")
    (sources / "secret.md").symlink_to(secret)
    (sources / "private").symlink_to(private, target_is_directory=True)
    return {"secret_link": sources / "secret.md", "secret": secret, "folder_link": sources / "private", "folder": private}


def test_discovery_skips_links_leading_outside_and_names_link_and_target(tmp_path, caplog):
    sources = tmp_path / "sources"
    sources.mkdir()
    paths = make_sources(tmp_path, tmp_path / "outside")

    with caplog.at_level(logging.WARNING, logger="qa_pipeline.documents"):
        keys = [source.key for source in discover_documents(sources)]

    assert keys == ["faq-link.md", "guide.md", "shared/faq.md"]
    warnings = caplog.text
    assert f"{paths['secret_link']} is skipped: it is a symbolic link to {paths['secret'].resolve()}" in warnings
    assert f"{paths['folder_link']} is skipped: it is a symbolic link to {paths['folder'].resolve()}" in warnings
    assert "QA_PIPELINE_FOLLOW_EXTERNAL_SYMLINKS" in warnings


def test_follow_external_symlinks_reads_linked_files_and_folders(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    make_sources(tmp_path, tmp_path / "outside")

    found = {source.key: source for source in discover_documents(sources, follow_external_symlinks=True)}

    assert set(found) == {"faq-link.md", "guide.md", "shared/faq.md", "secret.md", "private/notes.md"}
    assert SECRET in read_document(found["secret.md"]).text


def test_a_link_repointed_outside_after_discovery_is_refused_when_read(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    paths = make_sources(tmp_path, tmp_path / "outside")
    link = sources / "faq-link.md"
    source = next(s for s in discover_documents(sources) if s.key == "faq-link.md")

    link.unlink()
    link.symlink_to(paths["secret"])

    with pytest.raises(DocumentError) as raised:
        read_document(source)
    message = str(raised.value)
    assert str(link) in message and str(paths["secret"].resolve()) in message
    assert "outside the sources folder" in message and SECRET not in message


def test_the_setting_is_off_unless_the_variable_says_otherwise(monkeypatch):
    monkeypatch.delenv("QA_PIPELINE_FOLLOW_EXTERNAL_SYMLINKS", raising=False)
    assert StorageSettings.load().follow_external_symlinks is False
    monkeypatch.setenv("QA_PIPELINE_FOLLOW_EXTERNAL_SYMLINKS", "1")
    assert StorageSettings.load().follow_external_symlinks is True


def chunk_texts(env: dict[str, str]) -> dict[str, str]:
    rows = sql("SELECT document, string_agg(content, '\n') AS text FROM chunks GROUP BY document", env)
    return {row["document"]: row["text"] for row in rows}


def test_run_never_chunks_a_file_outside_the_sources_folder(data_dir, tmp_path):
    paths = make_sources(data_dir, tmp_path / "outside")
    env = cli_env(data_dir)

    completed = run_cli("run", "--chunks-only", env=env)

    output = completed.stdout + completed.stderr
    assert f"{paths['secret_link']} is skipped: it is a symbolic link to {paths['secret'].resolve()}" in output
    assert f"{paths['folder_link']} is skipped: it is a symbolic link to {paths['folder'].resolve()}" in output
    texts = chunk_texts(env)
    assert set(texts) == {"faq-link.md", "guide.md", "shared/faq.md"}
    assert "backup runs every night" in texts["faq-link.md"]
    assert not any(SECRET in text or SECRET_IN_FOLDER in text for text in texts.values())


def test_run_reads_outside_the_sources_folder_when_the_setting_allows_it(data_dir, tmp_path):
    make_sources(data_dir, tmp_path / "outside")
    env = cli_env(data_dir, QA_PIPELINE_FOLLOW_EXTERNAL_SYMLINKS="1")

    run_cli("run", "--chunks-only", env=env)

    texts = chunk_texts(env)
    assert SECRET in texts["secret.md"]
    assert SECRET_IN_FOLDER in texts["private/notes.md"]
