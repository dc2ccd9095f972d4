"""The `qa-pipeline` command: run the asset graph, query the outputs, start the simulator."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.progress import format_duration
from qa_pipeline.core.storage import Storage

DAGSTER_HOME_ENV = "DAGSTER_HOME"


def _dagster_home(layout: DataLayout) -> Path:
    """Runs are recorded in a persistent instance so `dagster dev` shows them afterwards."""
    home = Path(os.environ.get(DAGSTER_HOME_ENV) or layout.root / "dagster_home").absolute()
    home.mkdir(parents=True, exist_ok=True)
    os.environ[DAGSTER_HOME_ENV] = str(home)
    return home


def command_run(args: argparse.Namespace) -> int:
    from qa_pipeline.pipeline import PipelineOptions, run_pipeline

    layout = DataLayout.from_env(args.data_dir, args.sources_dir)
    _dagster_home(layout)
    options = PipelineOptions(
        documents=args.documents,
        limit=args.limit,
        concurrency=args.concurrency,
        levels=[int(x) for x in args.levels.split(",")] if args.levels else None,
        sample_size=args.sample_size,
        max_tokens=args.max_tokens,
        skip_benchmark=args.skip_benchmark,
        force_regenerate=args.force,
    )
    started = time.monotonic()
    outcome = run_pipeline(layout, options, log=lambda line: print(line, flush=True))
    print(outcome.report_markdown)
    print(
        f"qa-pipeline run: {len(outcome.succeeded)} documents done, {len(outcome.failed)} failed, "
        f"in {format_duration(time.monotonic() - started)}"
    )
    for document, reason in outcome.failed.items():
        print(f"  FAILED {document}: {reason}", file=sys.stderr)
    print('Query the outputs: qa-pipeline sql "SELECT * FROM qa_pairs LIMIT 5"')
    return 1 if outcome.failed else 0


def command_sql(args: argparse.Namespace) -> int:
    import duckdb
    import polars as pl

    storage = Storage(DataLayout.from_env(args.data_dir))
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


def command_report(args: argparse.Namespace) -> int:
    from qa_pipeline.core.report import build_report

    print(build_report(Storage(DataLayout.from_env(args.data_dir))).markdown())
    return 0


def command_simulate(args: argparse.Namespace) -> int:
    from qa_pipeline.core import simulator

    simulator.serve(simulator.config_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qa-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the whole asset graph for all (or selected) documents")
    run.add_argument("--data-dir", help="data root (default: $QA_PIPELINE_DATA_DIR or ./data)")
    run.add_argument("--sources-dir", help="source documents (default: DATA_DIR/sources)")
    run.add_argument("--documents", nargs="*", metavar="GLOB", help="only documents matching these patterns")
    run.add_argument("--limit", type=int, help="at most this many documents (in name order)")
    run.add_argument("--concurrency", type=int, help="requests in flight (default: the benchmark's recommendation)")
    run.add_argument("--levels", help="concurrency levels to benchmark, e.g. 1,4,8,16,32,64")
    run.add_argument("--sample-size", type=int, default=100, help="chunks in the stratified test sample")
    run.add_argument("--max-tokens", type=int, default=1024, help="max_tokens per generation request")
    run.add_argument("--skip-benchmark", action="store_true", help="reuse the last benchmark instead of sweeping")
    run.add_argument("--force", action="store_true", help="ignore the journal and cache; regenerate everything")
    run.set_defaults(func=command_run)

    sql = sub.add_parser("sql", help="run a DuckDB query over chunks, qa_pairs, failures, benchmark_runs")
    sql.add_argument("query")
    sql.add_argument("--data-dir")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.add_argument("--max-rows", type=int, default=50)
    sql.set_defaults(func=command_sql)

    report = sub.add_parser("report", help="print the quality report of the current outputs")
    report.add_argument("--data-dir")
    report.set_defaults(func=command_report)

    simulate = sub.add_parser("simulate", help="start the vLLM-compatible simulator on loopback")
    from qa_pipeline.core import simulator

    simulator.add_simulator_arguments(simulate)
    simulate.set_defaults(func=command_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
