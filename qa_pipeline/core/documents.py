"""Find source documents under the sources folder and read each one into text or pre-chunked records."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from qa_pipeline.core.parsers.html import html_to_markdown

SUPPORTED_SUFFIXES = (".md", ".rst", ".txt", ".html", ".htm", ".jsonl")

_HASH_BLOCK = 1 << 20
# Share of control bytes (other than tab, newlines, form feed) above which a file is not text.
_CONTROL_RATIO = 0.10
_CONTROL_SAMPLE = 1 << 16
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\f\v") + b"\x7f"
# Problems listed in a JSONL error before "and N more".
_LISTED_PROBLEMS = 5

logger = logging.getLogger("qa_pipeline.documents")


class DocumentFormat(StrEnum):
    """How a document's text is structured; chosen by its suffix."""

    MARKDOWN = "markdown"
    RST = "rst"
    TEXT = "text"
    HTML = "html"
    JSONL = "jsonl"


_FORMAT_BY_SUFFIX = {
    ".md": DocumentFormat.MARKDOWN,
    ".rst": DocumentFormat.RST,
    ".txt": DocumentFormat.TEXT,
    ".html": DocumentFormat.HTML,
    ".htm": DocumentFormat.HTML,
    ".jsonl": DocumentFormat.JSONL,
}


class DocumentError(Exception):
    """A source document cannot be used; the message names the file, the problem and the fix."""

    def __init__(self, path: Path | str, problem: str, remedy: str):
        super().__init__(f"{path}: {problem}. {remedy}")
        self.path = Path(path)
        self.problem = problem
        self.remedy = remedy


@dataclass(frozen=True)
class SourceFile:
    """One file found under the sources folder; `key` is its Dagster partition key.

    `confined_to` is the resolved sources folder that reading must not leave (through a symbolic
    link changed since discovery); None when leaving it was allowed or the file was named directly.
    """

    key: str
    path: Path
    size: int
    content_hash: str
    suffix: str
    confined_to: Path | None = None

    @property
    def supported(self) -> bool:
        return self.suffix in _FORMAT_BY_SUFFIX

    @classmethod
    def from_path(cls, path: Path, key: str | None = None) -> SourceFile:
        """Describe one file directly; the key defaults to the file name."""
        path = Path(path)
        return cls(
            key=partition_key(key if key is not None else path.name),
            path=path,
            size=path.stat().st_size,
            content_hash=_file_sha256(path),
            suffix=path.suffix.lower(),
        )


@dataclass(frozen=True)
class PrechunkedRecord:
    """One line of a pre-chunked JSONL file: its text and metadata, passed through chunking as-is."""

    line_number: int
    content: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class SkippedLine:
    """A JSONL line that was left out, and why."""

    line_number: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_number}: {self.reason}"


@dataclass(frozen=True)
class Document:
    """A document ready to chunk: `text` (Markdown for HTML input) or, for JSONL, `records`."""

    key: str
    path: Path
    format: DocumentFormat
    content_hash: str
    text: str = ""
    records: tuple[PrechunkedRecord, ...] = ()
    skipped_lines: tuple[SkippedLine, ...] = field(default=())

    @property
    def warnings(self) -> tuple[str, ...]:
        """What a user should be told although the document was read, e.g. "line 7: not valid JSON (...)"."""
        return tuple(str(line) for line in self.skipped_lines) + self._repeated_chunk_ids()

    def _repeated_chunk_ids(self) -> tuple[str, ...]:
        """Pre-chunked files often reuse `chunk_id`; each record stays its own chunk, but say so."""
        first_line: dict[str, int] = {}
        repeats: list[str] = []
        for record in self.records:
            source_id = record.metadata.get("chunk_id")
            if source_id is None:
                continue
            key = str(source_id)
            if key in first_line:
                repeats.append(f"line {record.line_number}: chunk_id {key!r} also on line {first_line[key]}")
            else:
                first_line[key] = record.line_number
        if not repeats:
            return ()
        more = f" (and {len(repeats) - _LISTED_PROBLEMS} more)" if len(repeats) > _LISTED_PROBLEMS else ""
        return (
            f"{len(repeats)} records repeat a chunk_id; each is kept as a separate chunk with its own id: "
            + "; ".join(repeats[:_LISTED_PROBLEMS])
            + more,
        )


# Dagster rejects partition keys containing "..." or control characters (and its UI
# cannot show them). Such characters are percent-encoded ("%0A", "%2E%2E%2E"); a "%"
# that already looks like an escape becomes "%25", so the mapping stays one-to-one and
# urllib.parse.unquote gives the name back. Names that need none of this are unchanged.
# Undecodable bytes in file names (surrogate escapes) are encoded the same way.
_KEY_ESCAPE = re.compile(r"%(?=[0-9A-Fa-f]{2})|[\x00-\x1f\x7f-\x9f\udc80-\udcff]|\.{3,}")


def _escape_key_part(match: re.Match[str]) -> str:
    text = match.group()
    if text == "%":
        return "%25"
    if text[0] == ".":
        return "%2E" * len(text)
    code = ord(text)
    if code >= 0xDC00:  # an undecodable byte of the file name, kept by surrogateescape
        return f"%{code - 0xDC00:02X}"
    return "".join(f"%{byte:02X}" for byte in text.encode("utf-8"))


def partition_key(relative_path: str) -> str:
    """The partition key for a POSIX relative path: the path itself unless Dagster would reject it."""
    return _KEY_ESCAPE.sub(_escape_key_part, relative_path)


@dataclass(frozen=True)
class FileStamp:
    """What a file's content hash was computed from: a file whose stamp is unchanged is not read again.

    The inode change time cannot be set by a program (unlike the modification time), so an edit
    that keeps the size and restores the modification time still changes the stamp.
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    content_hash: str


# A file changed this recently may change again within the file system clock's granularity (a few
# milliseconds on Linux) without its stamp changing, so its hash is not remembered (git's "racy" entries).
_RACY_NS = 500_000_000


def discover_documents(
    sources_dir: Path,
    follow_external_symlinks: bool = False,
    known: MutableMapping[str, FileStamp] | None = None,
) -> list[SourceFile]:
    """Every non-hidden file under `sources_dir`, sorted by key.

    Files with unsupported suffixes are listed too (`supported` is False) so that
    reading them raises a DocumentError naming the file instead of silently skipping it.
    A symbolic link that leads outside the folder (to a file or a folder) is skipped with a warning
    on the "qa_pipeline.documents" logger, unless `follow_external_symlinks`
    (QA_PIPELINE_FOLLOW_EXTERNAL_SYMLINKS): its target's text would otherwise be sent to the LLM
    server. Links that stay inside are read as files; linked folders inside are not walked, since
    their files are found where they are.
    """
    sources_dir = Path(sources_dir)
    if not sources_dir.is_dir():
        raise DocumentError(
            sources_dir,
            "the sources folder does not exist or is not a folder",
            "Create it and put your documents in it, or point QA_PIPELINE_SOURCES_DIR at your documents.",
        )
    root = sources_dir.resolve()
    confined_to = None if follow_external_symlinks else root
    found = []
    seen = set()
    for relative, path in _walk(sources_dir, "", root, follow_external_symlinks, {root}):
        key = partition_key(relative)
        seen.add(key)
        found.append(_source_file(key, path, confined_to, known))
    if known is not None:
        for key in set(known) - seen:
            del known[key]
    found.sort(key=lambda source: source.key)
    return found


def _source_file(
    key: str, path: Path, confined_to: Path | None, known: MutableMapping[str, FileStamp] | None
) -> SourceFile:
    """The file's description, its content hashed only when `known` has no stamp equal to its own."""
    info = path.stat()
    stamp = known.get(key) if known is not None else None
    if stamp is None or (stamp.size, stamp.mtime_ns, stamp.ctime_ns, stamp.inode) != (
        info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino
    ):
        content_hash = _file_sha256(path)
        if known is not None:
            known.pop(key, None)
            if time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) > _RACY_NS:
                known[key] = FileStamp(info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, content_hash)
    else:
        content_hash = stamp.content_hash
    return SourceFile(
        key=key, path=path, size=info.st_size, content_hash=content_hash, suffix=path.suffix.lower(),
        confined_to=confined_to,
    )


def find_document(sources_dir: Path, key: str, follow_external_symlinks: bool = False) -> SourceFile | None:
    """The file of one partition key, as `discover_documents` would list it, or None: a lookup that
    reads that file alone, whatever the size of the folder."""
    relative = urllib.parse.unquote(key, errors="surrogateescape")
    parts = relative.split("/")
    if partition_key(relative) != key or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    sources_dir = Path(sources_dir)
    root = sources_dir.resolve()
    path = sources_dir
    for index, part in enumerate(parts):
        path = path / part
        last = index == len(parts) - 1
        if path.is_symlink():
            external = not Path(os.path.realpath(path)).is_relative_to(root)
            if external and not follow_external_symlinks:
                _warn_external_link(path, Path(os.path.realpath(path)), root)
                return None
            if not last and not external:  # discovery does not walk links to folders inside
                return None
        if not last and not path.is_dir():
            return None
    if not path.is_file():
        return None
    return _source_file(key, path, None if follow_external_symlinks else root, None)


def _walk(
    folder: Path, relative: str, root: Path, follow_external: bool, walked: set[Path]
) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, path) of every non-hidden regular file under `folder`; see discover_documents."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:  # vanished or unreadable: as os.walk, list what can be listed
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(folder) / entry.name
        name = f"{relative}{entry.name}"
        external = False
        if entry.is_symlink():
            target = Path(os.path.realpath(path))
            external = not target.is_relative_to(root)
            if external and not follow_external:
                _warn_external_link(path, target, root)
                continue
        if entry.is_dir():  # follows links
            if entry.is_symlink() and not external:
                continue
            real = Path(os.path.realpath(path))
            if real not in walked:  # a linked folder that contains a link back to itself
                walked.add(real)
                yield from _walk(path, f"{name}/", root, follow_external, walked)
        elif entry.is_file():  # not broken links, sockets, fifos
            yield name, path


_warned_links: set[tuple[Path, Path]] = set()


def _warn_external_link(link: Path, target: Path, root: Path) -> None:
    # Once per process and link: discovery runs several times per command, and every minute in a sensor.
    if (link, target) in _warned_links:
        return
    _warned_links.add((link, target))
    logger.warning(
        "%s is skipped: it is a symbolic link to %s, outside the sources folder %s. Copy what it points "
        "to into the sources folder, or set QA_PIPELINE_FOLLOW_EXTERNAL_SYMLINKS=true to read it there.",
        link,
        target,
        root,
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def read_document(source: SourceFile | Path) -> Document:
    """Read and validate one source file; raises DocumentError for anything unusable."""
    if not isinstance(source, SourceFile):
        source = SourceFile.from_path(Path(source))
    path = source.path
    document_format = _FORMAT_BY_SUFFIX.get(source.suffix)
    if document_format is None:
        shown = f'"{source.suffix}"' if source.suffix else "no suffix"
        raise DocumentError(
            path,
            f"unsupported file type ({shown})",
            f"Supported types are {', '.join(SUPPORTED_SUFFIXES)}; convert the file to one of them, "
            "rename it if it already is one, or move it out of the sources folder.",
        )
    readable = path
    if source.confined_to is not None:
        # Checked again here: a link can be re-pointed between discovery and reading.
        readable = Path(os.path.realpath(path))
        if not readable.is_relative_to(source.confined_to):
            raise DocumentError(
                path,
                f"is a symbolic link to {readable}, outside the sources folder {source.confined_to}",
                "Copy what it points to into the sources folder, or set QA_PIPELINE_FOLLOW_EXTERNAL_SYMLINKS=true "
                "to read it there.",
            )
    try:
        data = readable.read_bytes()
    except OSError as error:
        raise DocumentError(path, f"cannot be read ({error.strerror})", "Check that it exists and is readable.")
    _check_is_text(path, data, whole_file=document_format is not DocumentFormat.JSONL)
    content_hash = hashlib.sha256(data).hexdigest()
    if document_format is DocumentFormat.JSONL:
        records, skipped = _read_jsonl(path, data)
        return Document(
            key=source.key,
            path=path,
            format=document_format,
            content_hash=content_hash,
            records=records,
            skipped_lines=skipped,
        )
    text = _normalize_newlines(_decode_utf8(path, data))
    if document_format is DocumentFormat.HTML:
        text = html_to_markdown(text)
        if not text.strip():
            raise DocumentError(
                path,
                "contains no text once the HTML markup and the page's menus, headers, footers and sidebars are removed",
                "Check that it is the page you meant.",
            )
    return Document(key=source.key, path=path, format=document_format, content_hash=content_hash, text=text)


_MAGIC = (
    (b"%PDF-", "a PDF file", "Convert it to Markdown or plain text first"),
    (b"PK\x03\x04", "a ZIP archive (or a .docx/.xlsx/.odt file)", "Unpack or export it to Markdown or text first"),
    (b"\x1f\x8b", "a gzip-compressed file", "Decompress it first"),
    (b"\xd0\xcf\x11\xe0", "an old Microsoft Office file", "Export it to Markdown or plain text first"),
)


_BINARY_REMEDY = (
    "Only text documents can be used: convert it to Markdown or plain text, or remove it from the sources folder."
)


def _check_is_text(path: Path, data: bytes, whole_file: bool) -> None:
    """Reject empty and binary files. A NUL byte anywhere makes a document binary; a JSONL
    file is judged by its start only, so that one corrupt line costs only that line."""
    if not data.strip():
        what = "is empty" if not data else "contains only whitespace"
        raise DocumentError(path, what, "Add content to it or remove it from the sources folder.")
    for magic, what, remedy in _MAGIC:
        if data.startswith(magic):
            raise DocumentError(path, f"is {what}, not text", f"{remedy}, or remove it from the sources folder.")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DocumentError(
            path,
            "is UTF-16 encoded",
            "Re-save it as UTF-8 (for example `iconv -f utf-16 -t utf-8`); "
            "UTF-8 with or without a byte-order mark is fine.",
        )
    nul = data.find(b"\x00", 0, None if whole_file else _CONTROL_SAMPLE)
    if nul != -1:
        raise DocumentError(
            path,
            f"looks binary, not text (NUL byte at byte offset {nul})",
            _BINARY_REMEDY,
        )
    sample = data[:_CONTROL_SAMPLE]
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    if controls > _CONTROL_RATIO * len(sample):
        raise DocumentError(
            path,
            f"looks binary, not text ({controls} control bytes in the first {len(sample)})",
            _BINARY_REMEDY,
        )


def _decode_utf8(path: Path, data: bytes, line_offset: int = 0) -> str:
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = bom + error.start
        line = data.count(b"\n", 0, offset) + 1 + line_offset
        raise DocumentError(
            path,
            f"is not valid UTF-8: byte 0x{data[offset]:02X} at byte offset {offset} (line {line}) "
            "cannot be decoded",
            "Re-save it as UTF-8 (for example `iconv -f latin1 -t utf-8 IN > OUT`); "
            "UTF-8 with a byte-order mark is fine.",
        ) from None


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _read_jsonl(path: Path, data: bytes) -> tuple[tuple[PrechunkedRecord, ...], tuple[SkippedLine, ...]]:
    """Good records and the lines that were skipped; fails only when no line is a valid record."""
    records: list[PrechunkedRecord] = []
    skipped: list[SkippedLine] = []
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line_start = offset
        offset += len(raw) + 1
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            skipped.append(SkippedLine(number, f"not valid UTF-8 (byte offset {line_start + error.start})"))
            continue
        record = _parse_record(line)
        if isinstance(record, str):
            skipped.append(SkippedLine(number, record))
        else:
            content, metadata = record
            records.append(PrechunkedRecord(line_number=number, content=content, metadata=metadata))
    if not records:
        listed = "; ".join(str(problem) for problem in skipped[:_LISTED_PROBLEMS])
        more = f" (and {len(skipped) - _LISTED_PROBLEMS} more)" if len(skipped) > _LISTED_PROBLEMS else ""
        raise DocumentError(
            path,
            f"has no valid record: {listed}{more}",
            'Each line must be a JSON object with a string "content" and an optional "metadata" object, '
            'for example {"content": "...", "metadata": {"service": "billing"}}.',
        )
    return tuple(records), tuple(skipped)


def _parse_record(line: str) -> tuple[str, dict[str, Any]] | str:
    """(content, metadata) for a valid line, else the reason it is not valid."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg} at column {error.colno})"
    if not isinstance(value, dict):
        return f"is a JSON {_json_type(value)}, not an object"
    if "content" not in value:
        return 'has no "content" field'
    content = value["content"]
    if not isinstance(content, str):
        return f'"content" is a JSON {_json_type(content)}, not a string'
    if not content.strip():
        return '"content" is empty'
    nested = value.get("metadata")
    if nested is None:
        nested = {}
    if not isinstance(nested, dict):
        return f'"metadata" is a JSON {_json_type(nested)}, not an object'
    # Some exports put fields such as "service" next to "content"; the nested value wins.
    metadata = {key: item for key, item in value.items() if key not in ("content", "metadata")}
    metadata.update(nested)
    return content, metadata


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


@dataclass(frozen=True)
class SourceChanges:
    """How the sources folder differs from the pipeline's partitions and the content it last acted on.

    Partition keys, sorted. A rename is a removal plus an addition; a file whose content is
    unchanged (touched, copied over itself) is in none of the three.
    """

    added: tuple[str, ...]  # a file with no partition yet
    changed: tuple[str, ...]  # a partition whose file's content hash differs from the known one
    removed: tuple[str, ...]  # a partition whose file is gone
    hashes: Mapping[str, str]  # content hash of every file now in the folder

    @property
    def to_generate(self) -> tuple[str, ...]:
        """Documents whose outputs must be (re)built: the new and the changed ones."""
        return tuple(sorted(self.added + self.changed))

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def compare_sources(
    hashes: Mapping[str, str], partitions: Iterable[str], known_hashes: Mapping[str, str] | None = None
) -> SourceChanges:
    """Compares the folder (`hashes`: key → content hash) with the partitions and the known hashes.

    With `known_hashes` None only partitions are compared (nothing counts as changed).
    """
    existing = set(partitions)
    added = tuple(key for key in sorted(hashes) if key not in existing)
    removed = tuple(sorted(existing - set(hashes)))
    changed = ()
    if known_hashes is not None:
        changed = tuple(
            key for key in sorted(hashes) if key in existing and known_hashes.get(key) != hashes[key]
        )
    return SourceChanges(added=added, changed=changed, removed=removed, hashes=dict(hashes))
