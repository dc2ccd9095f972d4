"""The `qa-pipeline` command: run the asset graph, query the outputs, start the simulator."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from qa_pipeline.core import settings as defaults
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.progress import format_duration
from qa_pipeline.core.settings import LLMSettings, SettingsError, StorageSettings, use_dagster_home
from qa_pipeline.core.storage import Storage

RESUME_HINT = "Finished chunks are saved; run the same command again to resume where it stopped."


class _Signals:
    """SIGTERM (kill, docker stop, systemd) stops as gently as Ctrl-C, in any step.

    The work runs in a thread and this (main) thread takes the signals, so no library in between
    can swallow one: the first asks for a stop (no new run or chunk starts; requests in flight finish
    and are saved), a second abandons requests in flight, and the command ends with status 130.
    """

    def __init__(self) -> None:
        from qa_pipeline.core.generation import STOP_REQUESTS

        self.requests = STOP_REQUESTS
        self.received: int | None = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum
        name = signal.Signals(signum).name
        if self.requests.request():
            print(
                f"{name} received: stopping. No new chunk starts; requests in flight finish and are saved. "
                "Send the signal again to abandon them.",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"{name} received again: abandoning requests in flight", file=sys.stderr, flush=True)

    def run(self, work):
        """`work()` in a thread, returning its result (or raising its exception) while signals are handled here."""
        import threading

        result: dict = {}

        def target() -> None:
            try:
                result["value"] = work()
            except BaseException as error:  # handed to the main thread
                result["error"] = error

        worker = threading.Thread(target=target, name="qa-pipeline run", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
        if "error" in result:
            raise result["error"]
        return result["value"]


def command_run(args: argparse.Namespace) -> int:
    from qa_pipeline.pipeline import PipelineOptions, run_pipeline

    storage_settings = StorageSettings.load(data_dir=args.data_dir, sources_dir=args.sources_dir)
    layout = DataLayout.from_settings(storage_settings)
    use_dagster_home(storage_settings, layout.root)
    options = PipelineOptions(
        documents=args.documents,
        limit=args.limit,
        concurrency=args.concurrency,
        levels=[int(x) for x in args.levels.split(",")] if args.levels else None,
        sample_size=args.sample_size,
        max_tokens=args.max_tokens,
        question_types=args.question_types.split(",") if args.question_types else None,
        question_type_descriptions=dict(args.describe_type or []),
        skip_benchmark=args.skip_benchmark,
        rebenchmark=args.rebenchmark,
        chunks_only=args.chunks_only,
        failed_only=args.failed,
        force_regenerate=args.force,
        request_timeout_s=args.request_timeout,
        stall_timeout_s=args.stall_timeout,
        failure_threshold=args.failure_threshold,
        model=args.model,
        multihop=args.multihop,
    )
    started = time.monotonic()
    signals = _Signals()
    try:
        outcome = signals.run(lambda: run_pipeline(layout, options, log=lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        print(f"qa-pipeline run: stopped by a signal. {RESUME_HINT}", file=sys.stderr)
        return 130
    except SettingsError as error:
        print(f"qa-pipeline run: {error}", file=sys.stderr)
        return 2
    if outcome.stopped == "interrupted" or signals.received:
        _print_failures(outcome.failed)
        print(f"qa-pipeline run: stopped by a signal. {RESUME_HINT}", file=sys.stderr)
        return 130
    if outcome.stopped == "server":
        print(f"qa-pipeline run: the LLM server cannot be used: {outcome.failed['LLM server']}", file=sys.stderr)
        print(f"No request was sent. {RESUME_HINT}", file=sys.stderr)
        return 1
    if outcome.stopped:
        _print_failures(outcome.failed)
        if outcome.stopped == "stalled":
            stall = options.stall_timeout_s or LLMSettings.load().stall_timeout_s
            print(
                f"qa-pipeline run: STALLED: the LLM server made no progress for {stall:g} s, "
                f"so no further document was started. Check the server. {RESUME_HINT}",
                file=sys.stderr,
            )
        elif outcome.stopped in ("unavailable", "disk_full"):
            what = "no LLM endpoint answered" if outcome.stopped == "unavailable" else "the data directory is full"
            print(f"qa-pipeline run: stopped: {what} (see the reason above). {RESUME_HINT}", file=sys.stderr)
        return 1
    print(outcome.report_markdown)
    _print_checks(outcome.checks)
    print(
        f"qa-pipeline run: {len(outcome.succeeded)} documents done, {len(outcome.failed)} failed, "
        f"in {format_duration(time.monotonic() - started)}"
    )
    _print_failures(outcome.failed)
    if options.model:
        print(f"Compare {options.model} with the other models: qa-pipeline compare")
    else:
        print('Query the outputs: qa-pipeline sql "SELECT * FROM qa_pairs LIMIT 5"')
    if outcome.runs:
        print(f"Dagster runs: {', '.join(run[:8] for run in outcome.runs)} (see them with `dagster dev`)")
    return 1 if outcome.failed else 0


def _print_failures(failed: dict[str, str]) -> None:
    """One line per failed document; documents that failed for the same reason share one line."""
    by_reason: dict[str, list[str]] = {}
    for document, reason in failed.items():
        by_reason.setdefault(reason, []).append(document)
    for reason, documents in by_reason.items():
        if len(documents) == 1:
            print(f"  FAILED {documents[0]}: {reason}", file=sys.stderr)
        else:
            named = ", ".join(documents[:5]) + (", ..." if len(documents) > 5 else "")
            print(f"  FAILED {len(documents)} documents ({named}): {reason}", file=sys.stderr)


def _print_checks(verdicts) -> None:
    """One line per check: how many documents passed, and which failed (a failing check is shown, not hidden)."""
    if not verdicts:
        return
    print("Checks (one verdict per document):")
    by_check: dict[str, list] = {}
    for verdict in verdicts:
        by_check.setdefault(verdict.check, []).append(verdict)
    for check, items in by_check.items():
        failed = sorted(v.document for v in items if not v.passed)
        line = f"  {check}: {len(items) - len(failed)}/{len(items)} documents passed"
        if failed:
            line += f"; FAILED: {', '.join(failed[:8])}{', ...' if len(failed) > 8 else ''}"
            line += f" ({next(v.description for v in items if not v.passed)})"
        print(line)


def command_sql(args: argparse.Namespace) -> int:
    import duckdb
    import polars as pl

    layout = DataLayout.from_env(args.data_dir)
    if "model_comparison" in args.query.lower():
        from qa_pipeline.core.comparison import refresh_comparison

        # The view's rows are recorded ones: computed again first when the models' tables changed since.
        if refresh_comparison(layout):
            print("model_comparison: computed again from the current tables (they changed since it was recorded)", file=sys.stderr)
    storage = Storage(layout)
    try:
        frame = storage.query(args.query)
    except duckdb.Error as error:
        print(f"qa-pipeline sql: {error}", file=sys.stderr)
        return 2
    if args.format == "csv":
        sys.stdout.write(frame.write_csv())
    elif args.format == "json":
        sys.stdout.write(frame.write_json() + "\n")
    else:
        with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
            print(frame)
    return 0


def command_compare(args: argparse.Namespace) -> int:
    import polars as pl

    from qa_pipeline.core.comparison import HIGHER_IS_BETTER, paired_view, record_comparison

    layout = DataLayout.from_env(args.data_dir)
    comparison, tables = record_comparison(layout)
    if comparison.height == 0:
        print(
            "qa-pipeline compare: no model has QA pairs yet; run `qa-pipeline run` and "
            "`qa-pipeline run --model NAME` first",
            file=sys.stderr,
        )
        return 1
    print(f"Models on the same {comparison['chunks'].max()} chunks (one column per model):")
    shown = comparison.drop("recorded_at", "inputs_fingerprint").with_columns(pl.col(pl.Float64).round(3))
    figures = shown.drop("model").transpose(include_header=True, header_name="figure", column_names=comparison["model"])
    better = {name: ("higher is better" if up else "lower is better") for name, up in HIGHER_IS_BETTER.items()}
    figures = figures.with_columns(pl.col("figure").replace_strict(better, default="").alias("better"))
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
        print(figures)
        paired = paired_view(tables, args.document, args.chunk)
        if paired.height:
            document, chunk = paired["document"][0], paired["chunk_id"][0]
            print(f"\nOne chunk, each model's pairs side by side ({document}, chunk {chunk}):")
            print(paired.drop("document", "chunk_id"))
    print('\nThe same rows: qa-pipeline sql "SELECT * FROM model_comparison"')
    return 0


def command_report(args: argparse.Namespace) -> int:
    from qa_pipeline.core.quality import refresh_pair_scores
    from qa_pipeline.core.report import build_report

    storage = Storage(DataLayout.from_env(args.data_dir))
    refresh_pair_scores(storage)
    print(build_report(storage).markdown())
    return 0


def command_compact(args: argparse.Namespace) -> int:
    storage = Storage(DataLayout.from_env(args.data_dir))
    compactions = storage.compact()
    for c in compactions:
        print(f"{c.table}: {c.documents} documents folded into a segment ({c.segments_merged} merged) in {c.seconds:.1f} s")
    if not compactions:
        print("qa-pipeline compact: nothing written or deleted since the last compaction")
    return 0


def command_export(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from qa_pipeline.core.export import ExportOptions, export_dataset

    layout = DataLayout.from_env(args.data_dir)
    try:
        train, validation, evaluation = (float(x) for x in args.split.split(","))
        options = ExportOptions(
            formats=tuple(args.formats.split(",")),
            train=train,
            validation=validation,
            evaluation=evaluation,
            seed=args.seed,
            split_by=args.split_by,
            min_groundedness=args.min_groundedness,
            min_evidence=args.min_evidence,
            drop_refusals=args.drop_refusals,
            drop_invented_numbers=args.drop_invented_numbers,
            drop_duplicates=args.drop_duplicates,
            exclude_failing_documents=args.exclude_failing_documents,
            **({} if args.chat_system_prompt is None else {"chat_system_prompt": args.chat_system_prompt or None}),
            chat_include_passage=args.chat_include_passage,
        )
    except (ValueError, ValidationError) as error:
        print(f"qa-pipeline export: invalid options: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else layout.exports_dir / "dataset"
    summary = export_dataset(Storage(layout), out, options)
    for split, rows in summary.rows.items():
        print(f"{split}: {rows} pairs from {len(summary.documents[split])} documents")
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if summary.dropped:
        print("dropped: " + ", ".join(f"{n} {reason}" for reason, n in summary.dropped.items()))
    print(f"written to {out} ({', '.join(path.name for path in summary.files)})")
    return 0


def command_export_batch(args: argparse.Namespace) -> int:
    import fnmatch

    from qa_pipeline.core.batch import export_batch_requests
    from qa_pipeline.core.generation import GenerationSettings

    model = args.model or LLMSettings.load().llm_model
    if not model:
        variable = LLMSettings.variable("llm_model")
        print(f"qa-pipeline export-batch: name the model the batch runs with (--model or {variable})", file=sys.stderr)
        return 2
    storage = Storage(DataLayout.from_env(args.data_dir))
    documents = None
    if args.documents:
        known = storage.query("SELECT DISTINCT document FROM chunks")["document"].to_list()
        documents = [d for d in known if any(fnmatch.fnmatch(d, pattern) for pattern in args.documents)]
    settings = GenerationSettings(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.question_types:
        settings = settings.model_copy(update={"question_types": tuple(args.question_types.split(","))})
    exported = export_batch_requests(storage, Path(args.file), model, settings, documents, include_done=args.all)
    print(
        f"{exported.requests} requests written to {exported.path} ({exported.already_done} chunks already have "
        f"QA pairs{'' if args.all else ' and were left out; --all includes them'}).\n"
        f"Run it, e.g. vllm run-batch -i {exported.path} -o results.jsonl --model {model}, "
        "then: qa-pipeline import-batch results.jsonl"
    )
    return 0


def command_import_batch(args: argparse.Namespace) -> int:
    from qa_pipeline.core.batch import import_batch_output
    from qa_pipeline.core.generation import GenerationSettings

    path = Path(args.file)
    if not path.is_file():
        print(f"qa-pipeline import-batch: {path} does not exist", file=sys.stderr)
        return 2
    settings = GenerationSettings(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.question_types:
        settings = settings.model_copy(update={"question_types": tuple(args.question_types.split(","))})
    imported = import_batch_output(Storage(DataLayout.from_env(args.data_dir)), path, settings)
    print(
        f"{imported.imported} chunks with QA pairs and {imported.failed} failed chunks imported into "
        f"{len(imported.documents)} documents"
    )
    if imported.unknown_chunks:
        unknown = len(imported.unknown_chunks)
        print(f"  {unknown} lines name chunks that do not exist (any more): skipped", file=sys.stderr)
    if imported.malformed_lines:
        shown = ", ".join(str(n) for n in imported.malformed_lines[:10])
        print(f"  lines that are not batch output lines of qa-pipeline requests: {shown}", file=sys.stderr)
    return 1 if imported.malformed_lines or imported.unknown_chunks else 0


def command_simulate(args: argparse.Namespace) -> int:
    from qa_pipeline.simulator.config import config_from_args
    from qa_pipeline.simulator.server import serve

    serve(config_from_args(args))
    return 0


def _checked(kind, text: str, what: str):
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(kind).validate_python(text)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _seconds(text: str) -> float:
    return _checked(defaults.Seconds, text, "a number of seconds > 0")


def _positive_int(text: str) -> int:
    return _checked(defaults.PositiveInt, text, "a whole number >= 1")


def _type_description(text: str) -> tuple[str, str]:
    kind, equals, line = text.partition("=")
    if not equals or not kind.strip() or not line.strip():
        raise argparse.ArgumentTypeError(f"expected TYPE=LINE, e.g. howto='asks how to do a task', got {text!r}")
    return kind.strip(), line.strip()


def _fraction(text: str) -> float:
    return _checked(defaults.Fraction, text, "a fraction from 0 to 1")


def _concurrency(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        level = int(text)
    except ValueError:
        level = 0
    if level < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of requests or 'auto', got {text!r}")
    return level


def build_parser() -> argparse.ArgumentParser:
    from qa_pipeline.documents_cli import add_documents_parser
    from qa_pipeline.embedded_cli import add_embedded_parser

    parser = argparse.ArgumentParser(prog="qa-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the whole asset graph for all (or selected) documents")
    run.add_argument("--data-dir", help="data root (default: $QA_PIPELINE_DATA_DIR or ./data)")
    run.add_argument("--sources-dir", help="source documents (default: DATA_DIR/sources)")
    run.add_argument("--documents", nargs="*", metavar="GLOB", help="only documents matching these patterns")
    run.add_argument("--limit", type=_positive_int, help="at most this many documents (in name order)")
    run.add_argument(
        "--model",
        metavar="NAME",
        help="a named model of the models file (QA_PIPELINE_MODELS_FILE): its pairs are kept apart, for "
        "`qa-pipeline compare` (default: the generator of QA_PIPELINE_LLM_*)",
    )
    run.add_argument(
        "--concurrency",
        type=_concurrency,
        metavar="N|auto",
        help="requests in flight, or 'auto' to follow the server's queue and KV cache "
        "(default: the benchmark's recommendation)",
    )
    run.add_argument("--levels", help="concurrency levels to benchmark, e.g. 1,4,8,16,32,64")
    run.add_argument(
        "--sample-size", type=_positive_int, default=defaults.DEFAULT_SAMPLE_SIZE, help="chunks in the stratified test sample"
    )
    run.add_argument(
        "--max-tokens", type=_positive_int, default=defaults.DEFAULT_MAX_TOKENS, help="max_tokens per generation request"
    )
    run.add_argument(
        "--question-types",
        help="comma-separated question types to ask for per chunk (default: factual,conceptual,comparison)",
    )
    run.add_argument(
        "--describe-type",
        action="append",
        type=_type_description,
        metavar="TYPE=LINE",
        help="the one line that tells the model what a question type is; repeatable",
    )
    run.add_argument(
        "--skip-benchmark",
        action="store_true",
        help="no concurrency sweep: use the last benchmark of this model and server however old, else adapt to the server",
    )
    run.add_argument(
        "--rebenchmark",
        action="store_true",
        help=f"sweep concurrency levels even if this model and server were benchmarked in the last "
        f"{defaults.BENCHMARK_REUSE_DAYS} days (by default that benchmark is reused)",
    )
    run.add_argument(
        "--multihop",
        action="store_true",
        help="also ask questions that need two or three related chunks of a document (`multihop_pairs`)",
    )
    run.add_argument(
        "--chunks-only", action="store_true", help="stop after chunking (to inspect chunks before generating)"
    )
    run.add_argument("--force", action="store_true", help="ignore the journal and cache; regenerate everything")
    run.add_argument(
        "--failed",
        action="store_true",
        help="re-run only the documents whose last run failed (inside them, only the chunks that failed)",
    )
    run.add_argument(
        "--request-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="give up on one request after this long, then retry it "
        f"(default: ${LLMSettings.variable('request_timeout_s')} or {defaults.DEFAULT_REQUEST_TIMEOUT_S:g})",
    )
    run.add_argument(
        "--stall-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="fail the run when no chunk finishes for this long "
        f"(default: ${LLMSettings.variable('stall_timeout_s')} or {defaults.DEFAULT_STALL_TIMEOUT_S:g})",
    )
    run.add_argument(
        "--failure-threshold",
        type=_fraction,
        default=defaults.DEFAULT_FAILURE_THRESHOLD,
        metavar="FRACTION",
        help="a document fails when more than this share of its chunks fail, from 0 to 1 "
        f"(default: {defaults.DEFAULT_FAILURE_THRESHOLD})",
    )
    run.set_defaults(func=command_run)

    sql = sub.add_parser(
        "sql",
        help="run a DuckDB query over chunks, qa_pairs, failures, pair_scores, question_duplicates, "
        "judgements, benchmark_runs",
    )
    sql.add_argument("query")
    sql.add_argument("--data-dir")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.add_argument("--max-rows", type=int, default=50)
    sql.set_defaults(func=command_sql)

    compare = sub.add_parser(
        "compare", help="the models side by side on the same chunks (speed, cost, failures, quality), and one chunk's pairs"
    )
    compare.add_argument("--data-dir")
    compare.add_argument("--document", help="the paired view shows a chunk of this document")
    compare.add_argument("--chunk", help="the paired view shows this chunk id (default: the first every model answered)")
    compare.set_defaults(func=command_compare)

    report = sub.add_parser("report", help="print the quality report of the current outputs")
    report.add_argument("--data-dir")
    report.set_defaults(func=command_report)

    compact = sub.add_parser(
        "compact",
        help="fold the per-document output files into a few large ones (the report does it past "
        "200 documents); safe while the pipeline runs",
    )
    compact.add_argument("--data-dir", default=None)
    compact.set_defaults(func=command_compact)

    export = sub.add_parser(
        "export", help="write the dataset as JSONL, Parquet and chat fine-tuning files, split by document"
    )
    export.add_argument("--data-dir")
    export.add_argument("--out", help="output folder (default: DATA_DIR/exports/dataset)")
    export.add_argument(
        "--formats",
        default="jsonl,parquet,chat",
        help="any of jsonl, parquet, chat, beir (corpus, queries, qrels), hf (Hugging Face dataset folder)",
    )
    export.add_argument("--split", default="0.8,0.1,0.1", help="train,validation,evaluation shares of the groups")
    export.add_argument(
        "--split-by",
        default="document",
        help="what a split is made of: document, or a metadata field of pre-chunked JSONL (e.g. service)",
    )
    export.add_argument("--seed", type=int, default=0, help="seed of the document split")
    export.add_argument("--min-groundedness", type=float, help="drop pairs below this groundedness")
    export.add_argument(
        "--min-evidence", type=float, help="drop pairs whose evidence quotes score below this in their chunk (0-1)"
    )
    export.add_argument("--drop-refusals", action="store_true", help='drop "the passage does not say" answers')
    export.add_argument(
        "--drop-invented-numbers", action="store_true", help="drop answers with numbers not in the chunk"
    )
    export.add_argument("--drop-duplicates", action="store_true", help="keep the first of duplicate questions")
    export.add_argument(
        "--exclude-failing-documents", action="store_true",
        help="leave out documents that fail the success-rate or groundedness check (default thresholds)",
    )
    export.add_argument("--chat-system-prompt", default=None, help="system message of chat examples ('' for none)")
    export.add_argument("--chat-include-passage", action="store_true", help="put the chunk in the user message")
    export.set_defaults(func=command_export)

    export_batch = sub.add_parser(
        "export-batch", help="write the generation requests as an OpenAI/vLLM batch file (vllm run-batch input)"
    )
    export_batch.add_argument("file")
    export_batch.add_argument("--data-dir")
    export_batch.add_argument("--model", help="served model name (default: $QA_PIPELINE_LLM_MODEL)")
    export_batch.add_argument("--max-tokens", type=_positive_int, default=defaults.DEFAULT_MAX_TOKENS)
    export_batch.add_argument("--temperature", type=float, default=0.0)
    export_batch.add_argument("--question-types", help="comma-separated (default: factual,conceptual,comparison)")
    export_batch.add_argument("--documents", nargs="*", metavar="GLOB", help="only documents matching these patterns")
    export_batch.add_argument("--all", action="store_true", help="also chunks that already have QA pairs")
    export_batch.set_defaults(func=command_export_batch)

    import_batch = sub.add_parser("import-batch", help="read a batch output file back into qa_pairs and failures")
    import_batch.add_argument("file")
    import_batch.add_argument("--data-dir")
    import_batch.add_argument(
        "--question-types",
        help="the --question-types the requests were exported with (default: factual,conceptual,comparison)",
    )
    import_batch.add_argument("--max-tokens", type=_positive_int, default=defaults.DEFAULT_MAX_TOKENS,
                              help="the --max-tokens of export-batch, recorded with the pairs")
    import_batch.add_argument("--temperature", type=float, default=0.0,
                              help="the --temperature of export-batch, recorded with the pairs")
    import_batch.set_defaults(func=command_import_batch)

    simulate = sub.add_parser("simulate", help="start the vLLM-compatible simulator on loopback")
    from qa_pipeline.simulator.config import add_simulator_arguments

    add_simulator_arguments(simulate)
    simulate.set_defaults(func=command_simulate)
    add_embedded_parser(sub)
    add_documents_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
