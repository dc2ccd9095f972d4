"""`qa-pipeline documents adopt|forget`: the deliberate ways to move a dataset to another sources folder
and to delete documents from it (a run never deletes documents missing from another or an empty folder).
"""

from __future__ import annotations

import argparse
import sys

import dagster as dg

from qa_pipeline.core.documents import DocumentError
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.settings import StorageSettings, use_dagster_home
from qa_pipeline.core.registry import adopt_sources_folder, name_list, same_folder


def command_adopt(args: argparse.Namespace) -> int:
    from qa_pipeline.defs.sensors import source_changes

    layout = DataLayout.from_env(args.data_dir, args.sources_dir)
    try:
        present = layout.discover_sources()
    except DocumentError as error:
        print(f"qa-pipeline documents adopt: {error}", file=sys.stderr)
        return 2
    if not present:
        print(
            f"qa-pipeline documents adopt: {layout.sources_dir} holds no document, so there is nothing to adopt. "
            "To delete every document of the dataset, run "
            f"`qa-pipeline documents forget --data-dir {layout.root} '*'`.",
            file=sys.stderr,
        )
        return 2
    missing = source_changes(_instance(layout), layout).removed
    before, after = adopt_sources_folder(layout)
    was = f" (was {before.sources_dir})" if before and not same_folder(before.sources_dir, after.sources_dir) else ""
    print(f"the dataset in {layout.root} is now registered from {after.sources_dir}{was}")
    if missing:
        print(
            f"{len(missing)} of its documents are not in that folder ({name_list(missing)}): the next "
            f"`qa-pipeline run` moves their outputs and journals to {layout.trash_dir}."
        )
    return 0


def command_forget(args: argparse.Namespace) -> int:
    from qa_pipeline.defs.sensors import forget_documents

    layout = DataLayout.from_env(args.data_dir)
    result = forget_documents(_instance(layout), layout, args.patterns)
    if not result.removed:
        patterns = " ".join(args.patterns)
        print(
            f"qa-pipeline documents forget: no document of the dataset in {layout.root} matches {patterns}",
            file=sys.stderr,
        )
        return 1
    print(f"forgot {len(result.removed)} documents: {name_list(result.removed)}")
    if result.trash is None:
        print("they had no outputs or journal")
    else:
        print(
            f"their outputs and journals are in {result.trash}; to restore them, move its contents back into "
            f"{layout.root} (e.g. `cp -a {result.trash}/. {layout.root}/`) and run `qa-pipeline run`"
        )
    return 0


def _instance(layout: DataLayout) -> dg.DagsterInstance:
    """The instance `qa-pipeline run` records to: $DAGSTER_HOME, else DATA_DIR/dagster_home."""
    use_dagster_home(StorageSettings.load(), layout.root)
    return dg.DagsterInstance.get()


def add_documents_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `documents` with its subcommands to the `qa-pipeline` parser."""
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", help="data root (default: $QA_PIPELINE_DATA_DIR or ./data)")

    documents = subparsers.add_parser(
        "documents", help="move the dataset to another sources folder, or delete documents from it"
    )
    commands = documents.add_subparsers(dest="documents_command", required=True)
    adopt = commands.add_parser(
        "adopt",
        parents=[data_dir],
        help="register every document of the dataset as coming from this sources folder; the next run "
        "deletes (to the trash) those missing from it",
    )
    adopt.add_argument("--sources-dir", help="the dataset's sources folder from now on (default: DATA_DIR/sources)")
    adopt.set_defaults(func=command_adopt)
    forget = commands.add_parser(
        "forget",
        parents=[data_dir],
        help="delete the documents matching these patterns: partitions removed, outputs and journals moved to "
        "DATA_DIR/trash (a document still in the sources folder is added back by the next run)",
    )
    forget.add_argument("patterns", nargs="+", metavar="GLOB", help="document keys, e.g. 'guides/*' or '*' for all")
    forget.set_defaults(func=command_forget)
