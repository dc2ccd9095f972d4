"""A dataset is deleted only on purpose: never because the sources folder is another one or empty, never by a
chunk-only run, and a deleted document's journal (its paid responses) goes to a trash it can be restored from.
"""

import argparse
import shutil
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.prompts import QAPair
from qa_pipeline.core.storage import ChunkResult, Journal, Storage, results_to_frames
from qa_pipeline.defs.resources import StorageResource
from qa_pipeline.defs.sensors import sync_document_partitions
from qa_pipeline.documents_cli import add_documents_parser

DOCUMENTS = ("install.md", "configure.md", "upgrade.md")
FINISHED = (3, 6)  # journal records (chunks) and QA pairs of each document


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


def write_sources(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f"# {name}\n\nHow to {name.removesuffix('.md')} the service.\n")


def chunk_results(document: str) -> list[ChunkResult]:
    pair = QAPair(question=f"What does {document} explain?", answer="The service.", type="factual")
    return [
        ChunkResult(
            document=document,
            chunk_id=f"{document}#{index}",
            request_hash=f"{document}-{index}",
            ok=True,
            pairs=[pair, pair],
            model="sim-model",
            finished_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        )
        for index in range(3)
    ]


def finished_dataset(instance: dg.DagsterInstance, layout: DataLayout, *names: str) -> None:
    """Registered from `layout.sources_dir`, with the journal and outputs a finished run leaves."""
    write_sources(layout.sources_dir, *names)
    sync_document_partitions(instance, layout)
    storage = Storage(layout)
    for name in names:
        results = chunk_results(name)
        with Journal(layout.journal_file(name)) as journal:
            for result in results:
                journal.append(result)
        pairs, failures = results_to_frames(results)
        storage.write_partition("qa_pairs", name, pairs)
        storage.write_partition("failures", name, failures)


def dataset(instance: dg.DagsterInstance, layout: DataLayout) -> dict[str, tuple[int, int]]:
    """Per partition: its journal's records and its rows in the qa_pairs view (what a user can lose)."""
    rows = dict(Storage(layout).query("SELECT document, count(*) FROM qa_pairs GROUP BY document").rows())
    return {
        key: (len(Journal(layout.journal_file(key)).load()), rows.get(key, 0))
        for key in instance.get_dynamic_partitions("documents")
    }


def documents_command(*args: str) -> int:
    parser = argparse.ArgumentParser(prog="qa-pipeline")
    add_documents_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["documents", *args])
    return parsed.func(parsed)


WHOLE = {name: FINISHED for name in DOCUMENTS}


def test_syncing_against_another_folder_deletes_nothing_and_names_both_folders(instance, data_dir, tmp_path):
    finished_dataset(instance, DataLayout(data_dir), *DOCUMENTS)
    other = tmp_path / "other"
    write_sources(other, "new.md")

    result = sync_document_partitions(instance, DataLayout(data_dir, sources_override=other))

    assert result.added == ("new.md",) and result.removed == () and result.trash is None
    assert set(result.kept) == set(DOCUMENTS)
    assert f"3 documents of the dataset in {data_dir} are not in {other}" in result.notice
    assert f"registered from {data_dir / 'sources'}" in result.notice
    assert "qa-pipeline documents adopt" in result.notice and "qa-pipeline documents forget" in result.notice
    assert dataset(instance, DataLayout(data_dir)) == {**WHOLE, "new.md": (0, 0)}
    assert not (data_dir / "trash").exists()

    # Back in the registered folder, the document added from the other one is not taken for a deletion.
    back = sync_document_partitions(instance, DataLayout(data_dir))
    assert back.removed == () and back.kept == ("new.md",) and str(other) in back.notice
    assert set(instance.get_dynamic_partitions("documents")) == {*DOCUMENTS, "new.md"}


def test_an_empty_sources_folder_deletes_nothing(instance, data_dir, tmp_path):
    finished_dataset(instance, DataLayout(data_dir), *DOCUMENTS)
    for name in DOCUMENTS:
        (data_dir / "sources" / name).unlink()
    empty = tmp_path / "empty"
    empty.mkdir()

    for layout in (DataLayout(data_dir), DataLayout(data_dir, sources_override=empty)):
        result = sync_document_partitions(instance, layout)
        assert result.removed == () and set(result.kept) == set(DOCUMENTS)
        assert f"the sources folder {layout.sources_dir} is empty" in result.notice
        assert "qa-pipeline documents forget" in result.notice

    assert dataset(instance, DataLayout(data_dir)) == WHOLE


def test_a_sync_without_deletions_keeps_even_a_document_removed_from_its_registered_folder(instance, data_dir):
    layout = DataLayout(data_dir)
    finished_dataset(instance, layout, *DOCUMENTS)
    (layout.sources_dir / "upgrade.md").unlink()

    chunks_only = sync_document_partitions(instance, layout, deletions_allowed=False)

    assert chunks_only.removed == () and chunks_only.kept == ("upgrade.md",)
    assert "this run deletes nothing" in chunks_only.notice
    assert dataset(instance, layout) == WHOLE


def test_a_document_removed_from_its_registered_folder_goes_to_the_trash_and_can_be_restored(instance, data_dir):
    layout = DataLayout(data_dir)
    finished_dataset(instance, layout, *DOCUMENTS)
    journal_before = Journal(layout.journal_file("upgrade.md")).load()
    (layout.sources_dir / "upgrade.md").unlink()

    result = sync_document_partitions(instance, layout)

    assert result.removed == ("upgrade.md",) and result.kept == () and result.notice is None
    assert result.trash is not None and result.trash.parent == data_dir / "trash"
    assert any(str(result.trash) in line for line in result.messages)
    assert dataset(instance, layout) == {"install.md": FINISHED, "configure.md": FINISHED}
    assert Storage(layout).query("SELECT count(*) AS n FROM qa_pairs WHERE document = 'upgrade.md'").item() == 0
    assert not layout.journal_file("upgrade.md").exists()

    # Restoring is moving the trash folder's contents back; the next sync registers the document again.
    shutil.copytree(result.trash, data_dir, dirs_exist_ok=True)
    shutil.rmtree(result.trash)
    write_sources(layout.sources_dir, "upgrade.md")
    assert Journal(layout.journal_file("upgrade.md")).load() == journal_before
    assert sync_document_partitions(instance, layout).added == ("upgrade.md",)
    assert dataset(instance, layout) == WHOLE


def test_the_sensor_deletes_nothing_when_pointed_at_another_folder(instance, data_dir, tmp_path):
    finished_dataset(instance, DataLayout(data_dir), *DOCUMENTS)
    other = tmp_path / "other"
    write_sources(other, "install.md")
    storage = StorageResource(data_dir=str(data_dir), sources_dir=str(other))
    from qa_pipeline.definitions import defs

    sensor = defs().resolve_sensor_def("source_documents_sensor")
    result = sensor(dg.build_sensor_context(instance=instance, resources={"storage": storage}))

    assert result.run_requests == [] and not result.dynamic_partitions_requests
    assert f"not in {other} (registered from {data_dir / 'sources'})" in result.skip_reason.skip_message
    assert dataset(instance, DataLayout(data_dir)) == WHOLE


def test_a_dataset_is_moved_to_another_folder_only_by_adopting_it(instance, data_dir, tmp_path, monkeypatch):
    finished_dataset(instance, DataLayout(data_dir), *DOCUMENTS)
    moved = tmp_path / "moved"
    write_sources(moved, "install.md", "configure.md")  # upgrade.md was dropped on the way
    layout = DataLayout(data_dir, sources_override=moved)
    assert sync_document_partitions(instance, layout).kept == ("upgrade.md",)

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    with dg.DagsterInstance.get() as cli_instance:
        cli_instance.add_dynamic_partitions("documents", list(DOCUMENTS))
        assert documents_command("adopt", "--data-dir", str(data_dir), "--sources-dir", str(moved)) == 0

    result = sync_document_partitions(instance, layout)
    assert result.removed == ("upgrade.md",) and result.kept == () and result.trash is not None
    assert dataset(instance, DataLayout(data_dir)) == {"install.md": FINISHED, "configure.md": FINISHED}


def test_a_dataset_older_than_the_registry_is_not_registered_from_a_folder_missing_its_documents(
    instance, data_dir, tmp_path
):
    finished_dataset(instance, DataLayout(data_dir), *DOCUMENTS)
    DataLayout(data_dir).sources_registry_file.unlink()  # as written before the registry existed
    other = tmp_path / "other"
    write_sources(other, "new.md")

    first = sync_document_partitions(instance, DataLayout(data_dir, sources_override=other))
    again = sync_document_partitions(instance, DataLayout(data_dir, sources_override=other))

    assert first.removed == again.removed == () and set(again.kept) == set(DOCUMENTS)
    assert "no recorded sources folder" in again.notice and "qa-pipeline documents adopt" in again.notice
    assert not DataLayout(data_dir).sources_registry_file.exists()
    assert dataset(instance, DataLayout(data_dir)) == {**WHOLE, "new.md": (0, 0)}


def test_forget_deletes_the_matching_documents_on_purpose_into_the_trash(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    layout = DataLayout(data_dir)
    with dg.DagsterInstance.get() as instance:
        finished_dataset(instance, layout, *DOCUMENTS)

        assert documents_command("forget", "--data-dir", str(data_dir), "up*", "configure.md") == 0
        out = capsys.readouterr().out
        assert "forgot 2 documents: configure.md, upgrade.md" in out and str(data_dir / "trash") in out
        assert dataset(instance, layout) == {"install.md": FINISHED}
        (trash,) = (data_dir / "trash").iterdir()
        assert len(Journal(trash / layout.journal_file("upgrade.md").relative_to(data_dir)).load()) == 3

        assert documents_command("forget", "--data-dir", str(data_dir), "missing*") == 1
        assert "no document of the dataset" in capsys.readouterr().err
