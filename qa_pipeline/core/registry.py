"""Which sources folder the documents of a data directory were registered from, and so which documents
missing from the current folder may be deleted: only those registered from it, never because it is empty.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from shlex import quote

from pydantic import BaseModel, Field, ValidationError

from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.storage import write_text_atomic

_LISTED = 5


class RegistryError(ValueError):
    """The registry file cannot be read; nothing is deleted until it is fixed."""


class SourcesRegistry(BaseModel):
    """DATA_DIR/sources-registry.json, written when the dataset's first documents are registered."""

    sources_dir: str
    registered_at: datetime
    # Documents added while the pipeline was pointed at another folder: partition key → that folder.
    elsewhere: dict[str, str] = Field(default_factory=dict)

    def folder_of(self, key: str) -> str:
        return self.elsewhere.get(key, self.sources_dir)


@dataclass(frozen=True)
class DeletionPlan:
    """Of the documents missing from the current folder, those to delete and those kept, with why."""

    deleted: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    notice: str | None = None  # why documents were kept and how to delete them, for the user


def read_registry(layout: DataLayout) -> SourcesRegistry | None:
    path = layout.sources_registry_file
    if not path.exists():
        return None
    try:
        return SourcesRegistry.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as error:
        raise RegistryError(
            f"{path} is not a valid sources registry ({error.errors()[0]['msg']}), so no document is deleted. "
            f"Restore it, or run `qa-pipeline documents adopt --data-dir {quote(str(layout.root))} "
            "--sources-dir FOLDER` with the dataset's sources folder."
        ) from None


def write_registry(layout: DataLayout, registry: SourcesRegistry) -> None:
    write_text_atomic(registry.model_dump_json(indent=2) + "\n", layout.sources_registry_file)


def same_folder(a: str | Path, b: str | Path) -> bool:
    """The same folder, named alike or through a symbolic link."""
    return Path(a) == Path(b) or Path(a).resolve() == Path(b).resolve()


def plan_deletions(
    layout: DataLayout, removed: Sequence[str], documents_in_folder: int, *, deletions_allowed: bool = True
) -> DeletionPlan:
    """Which of `removed` (documents with a partition but no file in `layout.sources_dir`) to delete.

    Only documents registered from this very folder, only when it holds documents, and only when
    deletions are allowed. The first call that sees documents and none missing records the current
    folder as the dataset's; a dataset older than the registry with documents missing needs
    `adopt_sources_folder`.
    """
    registry = read_registry(layout)
    if registry is None and documents_in_folder and not removed:
        registry = adopt_sources_folder(layout)[1]
    if not removed:
        return DeletionPlan()
    folder, root, count = layout.sources_dir, layout.root, len(removed)
    if not documents_in_folder:
        return DeletionPlan(
            kept=tuple(removed),
            notice=(
                f"the sources folder {folder} is empty but the dataset in {root} has {_documents(count)}: "
                "not deleting them (an unmounted or emptied folder would erase the dataset). If every "
                f"document was really removed, run `{_forget(layout, quote('*'))}`."
            ),
        )
    if registry is None:
        return DeletionPlan(
            kept=tuple(removed),
            notice=(
                f"{_documents(count)} of the dataset in {root} {_are(count)} not in {folder}, and the dataset has no "
                f"recorded sources folder yet: kept ({name_list(removed)}). "
                f"If {folder} is its sources folder, run `{_adopt(layout)}`; the next `qa-pipeline run` "
                f"then moves them to the trash. To delete some of them now: `{_forget(layout)}`."
            ),
        )
    foreign = tuple(key for key in removed if not same_folder(registry.folder_of(key), folder))
    here = tuple(key for key in removed if key not in foreign)
    notices = []
    if foreign:
        by_folder = Counter(registry.folder_of(key) for key in foreign)
        registered = ", ".join(f"{name} ({n})" if len(by_folder) > 1 else name for name, n in by_folder.most_common())
        move = f"; to move the dataset to {folder}, run `{_adopt(layout)}`"
        if same_folder(registry.sources_dir, folder):
            move = ""
        notices.append(
            f"{_documents(len(foreign))} of the dataset in {root} {_are(len(foreign))} not in {folder} (registered from "
            f"{registered}): kept ({name_list(foreign)}). To delete them, remove them from the folder they "
            f"were registered from and run from there, or run `{_forget(layout)}`{move}."
        )
    if here and not deletions_allowed:
        notices.append(
            f"{_documents(len(here))} removed from {folder} {_are(len(here))} kept: this run deletes nothing "
            f"({name_list(here)}). A full `qa-pipeline run` moves their outputs to the trash."
        )
    deleted = here if deletions_allowed else ()
    return DeletionPlan(
        deleted=deleted,
        kept=tuple(key for key in removed if key not in deleted),
        notice=" ".join(notices) or None,
    )


def adopt_sources_folder(layout: DataLayout) -> tuple[SourcesRegistry | None, SourcesRegistry]:
    """Registers every document of the dataset as coming from `layout.sources_dir`: (before, after).

    The deliberate way to move a dataset to another folder: from then on the documents missing from
    it are deleted (to the trash) by the next sync that allows deletions.
    """
    try:
        before = read_registry(layout)
    except RegistryError:
        before = None  # adopting is how a damaged registry is replaced
    after = SourcesRegistry(sources_dir=str(layout.sources_dir), registered_at=datetime.now(timezone.utc))
    write_registry(layout, after)
    return before, after


def record_added(layout: DataLayout, keys: Sequence[str]) -> None:
    """Notes the folder of documents added while the pipeline pointed at a folder other than the dataset's."""
    registry = read_registry(layout)
    if registry is None or not keys:
        return
    folder = str(layout.sources_dir)
    elsewhere = dict(registry.elsewhere)
    for key in keys:
        if same_folder(registry.sources_dir, folder):
            elsewhere.pop(key, None)
        else:
            elsewhere[key] = folder
    if elsewhere != registry.elsewhere:
        write_registry(layout, registry.model_copy(update={"elsewhere": elsewhere}))


def record_deleted(layout: DataLayout, keys: Sequence[str]) -> None:
    registry = read_registry(layout)
    gone = set(keys)
    if registry is not None and gone & registry.elsewhere.keys():
        elsewhere = {key: folder for key, folder in registry.elsewhere.items() if key not in gone}
        write_registry(layout, registry.model_copy(update={"elsewhere": elsewhere}))


def _documents(count: int) -> str:
    return f"{count} document" if count == 1 else f"{count} documents"


def _are(count: int) -> str:
    return "is" if count == 1 else "are"


def name_list(keys: Sequence[str]) -> str:
    """The first few keys, and how many more."""
    return ", ".join(keys[:_LISTED]) + (f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def _adopt(layout: DataLayout) -> str:
    root, folder = quote(str(layout.root)), quote(str(layout.sources_dir))
    return f"qa-pipeline documents adopt --data-dir {root} --sources-dir {folder}"


def _forget(layout: DataLayout, patterns: str = "GLOB") -> str:
    return f"qa-pipeline documents forget --data-dir {quote(str(layout.root))} {patterns}"
