"""Throughput benchmarks P1-P5 of issue 5 and P6-P7 of issue 12, on simulator processes; one line per target.

    python benchmarks/run.py            # the full set
    python benchmarks/run.py --quick    # smaller workloads: a smoke test, not the targets
    python benchmarks/run.py --only P1,P4
    python benchmarks/run.py --only P3,P6,P7 --documents-per-run 1,50   # also with other documents per run

Each line reads `NAME measure=value target>=goal PASS|FAIL (details)`. Plots and a JSON of the
figures go to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.backfill import run_backfill  # noqa: E402
from benchmarks.doc_site import build_pages, write_pages  # noqa: E402
from benchmarks.doc_site_run import regenerate_through_sensor, run_cli  # noqa: E402
from benchmarks.shared_runs import run_shared  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    SETTINGS,
    THROUGHPUT_PROFILE,
    ZERO_LATENCY_PROFILE,
    batch_and_wait,
    client_config,
    make_tasks,
    process_cpu_s,
    run_generator,
)
from qa_pipeline.core import benchmark as bench  # noqa: E402
from qa_pipeline.core.client import LLMClient  # noqa: E402
from qa_pipeline.core.concurrency import AdaptiveLimit, FixedLimit  # noqa: E402
from qa_pipeline.core.plots import plot_generation_telemetry  # noqa: E402
from qa_pipeline.core.prompts import build_messages  # noqa: E402
from qa_pipeline.simulator.process import start_simulator_process  # noqa: E402

SWEEP_LEVELS = (1, 4, 8, 16, 32, 64, 128)
# The simulator's default capacity model (64 sequences, 10 ms + 0.25 ms per sequence per step), with
# outputs kept under max_tokens so none is cut.
BACKFILL_PROFILE = {"output_tokens_max": 1000}


@dataclass
class Sizes:
    p1_chunks: int
    p2_chunks: int
    p3_documents: int
    p3_chunks_per_document: int
    p4_chunks: int
    sweep_seconds_per_level: float
    sweep_levels: tuple[int, ...]
    shared_runs: int = 4  # P3 with several runs at once: runs, each over this many documents of 20 chunks
    shared_documents_per_run: int = 10
    doc_site_pages: int = 300  # P6/P7
    changed_page_every: int = 6  # P7 edits every 6th page


FULL = Sizes(2000, 400, 100, 20, 10000, 30.0, SWEEP_LEVELS)
QUICK = Sizes(600, 300, 100, 5, 3000, 12.0, (1, 8, 32, 64, 128), shared_documents_per_run=4, doc_site_pages=60)
ALL = ("P1", "P2", "P3", "P4", "P5", "P6", "P7")
# Fixed levels per run that P3's several-runs comparison tries: 4 x 32 is the best single-run level.
SHARED_FIXED_LEVELS = (32, 64)


@dataclass
class Line:
    name: str
    measure: str
    value: float
    goal: float | None  # None: a figure for the record, not a target
    details: str

    @property
    def passed(self) -> bool:
        return self.goal is not None and self.value >= self.goal

    @property
    def verdict(self) -> str:
        return "-" if self.goal is None else "PASS" if self.passed else "FAIL"

    def text(self) -> str:
        value = f"{self.value:.0f}" if self.value >= 100 else f"{self.value:.3f}"
        if self.goal is None:
            return f"{self.name} {self.measure}={value} (not a target; {self.details})"
        goal = f"{self.goal:.0f}" if self.goal >= 100 else f"{self.goal:g}"
        return f"{self.name} {self.measure}={value} target>={goal} {self.verdict} ({self.details})"


@dataclass
class Session:
    out: Path
    sizes: Sizes
    lines: list[Line] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    offset: int = 0

    def tasks(self, count: int, document: str):
        # Fresh chunks for every run, so no run is helped by another's cached lengths or journal.
        tasks = make_tasks(count, document, offset=self.offset)
        self.offset += count
        return tasks

    def report(self, line: Line) -> None:
        self.lines.append(line)
        print(line.text(), flush=True)


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def describe_run(label: str, run, ceiling: float) -> str:
    return (
        f"{label}: {run.output_tokens_per_s:.0f} output tok/s = {run.output_tokens_per_s / ceiling:.3f} of the "
        f"ceiling, {run.chunks} chunks ({run.valid} valid) in {run.duration_s:.1f} s"
    )


def sweep(session: Session, base_url: str) -> tuple[int, int, list]:
    """The concurrency benchmark asset's own functions on a 100-chunk test sample."""
    sample = [build_messages(t.content, list(t.heading_path)) for t in session.tasks(100, "test-sample")]

    async def go():
        async with LLMClient(client_config(base_url)) as client:
            await client.resolve_model()
            return await bench.sweep(
                client, sample, session.sizes.sweep_levels, SETTINGS,
                session.sizes.sweep_seconds_per_level, log=lambda line: None,
            )

    results = asyncio.run(go())
    recommended = bench.recommend_level(results)
    best = max(results, key=lambda r: r.output_tokens_per_s).concurrency
    levels = ", ".join(f"{r.concurrency}: {r.output_tokens_per_s:.0f}" for r in results)
    log(f"sweep (output tok/s by level) {levels}; recommended {recommended}, best {best}")
    session.figures["sweep"] = {r.concurrency: r.output_tokens_per_s for r in results}
    return recommended, best, results


def throughput_workloads(session: Session, only: set[str]) -> None:
    with start_simulator_process(**THROUGHPUT_PROFILE) as sim:
        ceiling = sim.stats()["ceiling_output_tokens_per_s"]
        session.figures["ceiling_output_tokens_per_s"] = ceiling
        log(f"simulator {THROUGHPUT_PROFILE}: ceiling {ceiling:.0f} output tok/s")

        if only & {"P1", "P5"}:
            recommended, best, _ = sweep(session, sim.base_url)
            runs = {}
            n = session.sizes.p1_chunks
            # The same chunks for every compared run: the same prompts draw the same output lengths.
            p1_tasks = session.tasks(n, "p1")
            if "P1" in only:
                runs["auto"] = run_generator(sim.base_url, p1_tasks, AdaptiveLimit())
                log(describe_run("P1 auto", runs["auto"], ceiling))
                (session.out / "p1_auto.png").write_bytes(
                    plot_generation_telemetry(runs["auto"].telemetry, f"P1: {n} chunks, concurrency auto")
                )
            for level in sorted({best, recommended}):
                runs[level] = run_generator(sim.base_url, p1_tasks, FixedLimit(level))
                log(describe_run(f"P1 fixed {level}", runs[level], ceiling))
            session.figures["p1"] = {str(k): r.output_tokens_per_s for k, r in runs.items()}
            if "P1" in only:
                auto = runs["auto"]
                session.report(Line(
                    "P1", "achieved/ceiling", auto.output_tokens_per_s / ceiling, 0.95,
                    f"concurrency auto, {n} chunks, {auto.output_tokens_per_s:.0f} of {ceiling:.0f} output tok/s "
                    f"in {auto.duration_s:.1f} s, ramp-up and tail included",
                ))
                fixed_best = max((k for k in runs if k != "auto"), key=lambda k: runs[k].output_tokens_per_s)
                session.report(Line(
                    "P1", "adaptive/best-fixed", auto.output_tokens_per_s / runs[fixed_best].output_tokens_per_s, 0.90,
                    f"best fixed level {fixed_best}: {runs[fixed_best].output_tokens_per_s:.0f} output tok/s",
                ))
            if "P5" in only:
                session.report(Line(
                    "P5", "recommended/best", runs[recommended].output_tokens_per_s / runs[best].output_tokens_per_s,
                    0.95,
                    f"recommended level {recommended} vs best swept level {best}, each on the same {n} chunks",
                ))

        if "P3" in only:
            shared_runs_comparison(session, sim.base_url, ceiling)

        if "P2" in only:
            n = session.sizes.p2_chunks
            p2_tasks = session.tasks(n, "p2")
            batched = asyncio.run(batch_and_wait(sim.base_url, p2_tasks))
            log(f"P2 batch-and-wait: {batched.output_tokens_per_s:.0f} output tok/s, {n} chunks in {batched.duration_s:.1f} s")
            ours = run_generator(sim.base_url, p2_tasks, AdaptiveLimit())
            log(describe_run("P2 qa_pipeline auto", ours, ceiling))
            session.figures["p2"] = {"batch_and_wait": batched.output_tokens_per_s, "qa_pipeline": ours.output_tokens_per_s}
            session.report(Line(
                "P2", "qa_pipeline/batch-and-wait", ours.output_tokens_per_s / batched.output_tokens_per_s, 1.2,
                f"{ours.output_tokens_per_s:.0f} vs {batched.output_tokens_per_s:.0f} output tok/s on the same {n} chunks "
                "(batches of 100, semaphore 30)",
            ))



def shared_runs_comparison(session: Session, base_url: str, ceiling: float) -> None:
    """P3's second target: several runs at once on one server, `concurrency: auto` in each vs the best
    fixed level per run, on the same chunks (see benchmarks/shared_runs.py)."""
    sizes = session.sizes
    args = (base_url, sizes.shared_runs, sizes.shared_documents_per_run, sizes.p3_chunks_per_document)
    # The same documents (so the same output lengths) for every compared setting, unlike any other workload's.
    first = -(-session.offset // sizes.p3_chunks_per_document)
    session.offset = (first + sizes.shared_runs * sizes.shared_documents_per_run) * sizes.p3_chunks_per_document
    results = {limit: run_shared(*args, limit, first_document=first) for limit in ("auto", *map(str, SHARED_FIXED_LEVELS))}
    for limit, result in results.items():
        log(
            f"P3 {result.runs} runs at once, concurrency {limit} each: {result.output_tokens_per_s:.0f} output tok/s "
            f"= {result.output_tokens_per_s / ceiling:.3f} of the ceiling, {result.chunks} chunks in {result.duration_s:.1f} s; "
            f"per run {', '.join(f'{v:.0f}' for v in result.per_run_tokens_per_s)}"
        )
    auto = results.pop("auto")
    best = max(results.values(), key=lambda r: r.output_tokens_per_s)
    session.figures["p3_shared"] = {
        "auto": auto.output_tokens_per_s, **{limit: r.output_tokens_per_s for limit, r in results.items()},
        "auto_per_run": auto.per_run_tokens_per_s,
    }
    session.report(Line(
        "P3", "adaptive/best-fixed (several runs)", auto.output_tokens_per_s / best.output_tokens_per_s, 0.90,
        f"{auto.runs} runs at once x {sizes.shared_documents_per_run} documents x {sizes.p3_chunks_per_document} chunks "
        f"on one server: auto {auto.output_tokens_per_s:.0f} vs fixed {best.limit} per run "
        f"{best.output_tokens_per_s:.0f} output tok/s; auto's runs got {min(auto.per_run_tokens_per_s):.0f}"
        f"-{max(auto.per_run_tokens_per_s):.0f} tok/s each",
    ))


def backfill_workload(session: Session, variants: list[str]) -> None:
    """P3 on the simulator's default capacity model (ceiling 2,462 tok/s): 100 x 20 chunks take about
    four minutes at the ceiling, long enough that the daemon's pace (it looks at new backfills every
    30 s) is part of the measure without being all of it. The project's defaults: no run config, the
    default documents per run (then each of `variants`, for the record)."""
    with start_simulator_process(**BACKFILL_PROFILE) as sim:
        ceiling = sim.stats()["ceiling_output_tokens_per_s"]
        log(f"simulator {BACKFILL_PROFILE} (defaults otherwise): ceiling {ceiling:.0f} output tok/s")
        sizes = session.sizes
        for documents_per_run in [None, *variants]:
            label = "default" if documents_per_run is None else documents_per_run
            result = run_backfill(
                sim.base_url, sizes.p3_documents, sizes.p3_chunks_per_document,
                output_tokens_total=lambda: sim.stats()["output_tokens_total"], log=log,
                documents_per_run=documents_per_run, timeout_s=900.0 if documents_per_run is None else 3600.0,
            )
            samples = result.running_samples
            full = sum(s >= THROUGHPUT_PROFILE["max_num_seqs"] for s in samples) / max(1, len(samples))
            generating = result.duration_s - result.first_run_start_s
            log(
                f"P3 [documents per run {label}]: {result.documents} documents, {result.chunks} chunks, "
                f"{result.runs} run(s), {result.succeeded} materialized, {result.check_evaluations} check "
                f"evaluations; first run started {result.first_run_start_s:.1f} s after submission, last ended "
                f"at {result.duration_s:.1f} s (the work queue took {result.queue_duration_s:.1f} s); batch full "
                f"in {full:.0%} of samples; {result.output_tokens / generating / ceiling:.3f} of the ceiling "
                "from the run's start"
            )
            if result.phases:
                log("P3 run phases: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.phases.items()))
            session.figures[f"p3[{label}]" if documents_per_run else "p3"] = {
                "duration_s": result.duration_s, "first_run_start_s": result.first_run_start_s,
                "output_tokens_per_s": result.output_tokens_per_s, "runs": result.runs,
                "materialized": result.succeeded, "check_evaluations": result.check_evaluations,
                "batch_full_share": full, "queue_duration_s": result.queue_duration_s, "phases_s": result.phases,
            }
            session.report(Line(
                "P3" if documents_per_run is None else f"P3 [documents per run {label}]",
                "achieved/ceiling", result.output_tokens_per_s / ceiling, 0.90 if documents_per_run is None else None,
                f"asset backfill of {result.documents} partitions x {sizes.p3_chunks_per_document} chunks with "
                f"the project's defaults ({label} documents per run: {result.runs} run(s); no run config: "
                f"concurrency auto, as no benchmark has run); from submission to the end of the last run: "
                f"{result.output_tokens_per_s:.0f} output tok/s in {result.duration_s:.1f} s, of which "
                f"{result.first_run_start_s:.1f} s before the first run started",
            ))


def doc_site_workload(session: Session, only: set[str], variants: list[str]) -> None:
    """P6, the default `qa-pipeline run` over a 300-page documentation site, and P7, the sources sensor
    regenerating every 6th page after an edit; on the simulator's defaults (ceiling 2,462 tok/s),
    outputs under the CLI's max_tokens. With the default documents per run, then each of `variants`."""
    sizes = session.sizes
    pages = build_pages(sizes.doc_site_pages)
    chunks = sum(page.chunks for page in pages)
    short = sum(page.chunks <= 3 for page in pages)
    with start_simulator_process(**BACKFILL_PROFILE) as sim:
        ceiling = sim.stats()["ceiling_output_tokens_per_s"]
        log(
            f"simulator {BACKFILL_PROFILE} (defaults otherwise): ceiling {ceiling:.0f} output tok/s; "
            f"{len(pages)} pages, {chunks} chunks, {short} pages of 1-3 chunks, the longest "
            f"{max(page.chunks for page in pages)}"
        )
        with tempfile.TemporaryDirectory(prefix="qa-bench-p6-") as scratch:
            root = Path(scratch)  # the default run's data folder, which P7 then changes
            for documents_per_run in [None, *variants]:
                suffix = "" if documents_per_run is None else f" [documents per run {documents_per_run}]"
                with tempfile.TemporaryDirectory(prefix="qa-bench-p6-") as other:
                    folder = root if documents_per_run is None else Path(other)
                    write_pages(pages, folder / "data" / "sources")
                    log(f"P6{suffix}: qa-pipeline run over {len(pages)} pages")
                    run = run_cli(
                        sim.base_url, folder, pages, ceiling, lambda: sim.stats()["output_tokens_total"],
                        documents_per_run=documents_per_run, log=log,
                    )
                    report_cli_run(session, run, ceiling, suffix)
            if "P7" not in only:
                return
            # Each setting regenerates the same 50 pages of the default run's dataset, edited once more.
            for documents_per_run in [None, *variants]:
                suffix = "" if documents_per_run is None else f" [documents per run {documents_per_run}]"
                changed = regenerate_through_sensor(
                    sim.base_url, root, pages, sim.stats, log=log, every=sizes.changed_page_every,
                    documents_per_run=documents_per_run,
                )
                report_sensor_run(session, changed, ceiling, suffix)


def report_cli_run(session: Session, run, ceiling: float, suffix: str) -> None:
    at_ceiling = run.output_tokens / ceiling
    log(
        f"P6{suffix}: exit code {run.exit_code}; {run.chunks} chunks, {run.output_tokens} output tokens in "
        f"{run.generation_s:.1f} s of generation (requests in flight {run.busy_s / run.generation_s:.0%} of it); "
        f"runs: {run.runs}; wall {run.wall_s:.1f} s = {run.wall_s / at_ceiling:.2f} x the generation at the "
        f"ceiling ({at_ceiling:.1f} s); the server produced {run.simulator_tokens} output tokens in all (sweep included)"
    )
    for name, seconds in run.phases.items():
        log(f"    {seconds:7.1f} s  {name}")
    session.figures[f"p6{suffix}"] = {
        "exit_code": run.exit_code, "pages": run.pages, "chunks": run.chunks, "output_tokens": run.output_tokens,
        "generation_s": run.generation_s, "busy_s": run.busy_s, "wall_s": run.wall_s, "runs": run.runs,
        "wall_over_generation_at_ceiling": run.wall_s / at_ceiling, "phases_s": run.phases,
    }
    session.report(Line(
        f"P6{suffix}", "generation/ceiling", run.output_tokens_per_s / ceiling, 0.92 if not suffix else None,
        f"`qa-pipeline run` over {run.pages} pages ({run.chunks} chunks), {run.runs['qa_pairs']} qa_pairs run(s): "
        f"{run.output_tokens_per_s:.0f} output tok/s from the first generation request to the last answer "
        f"({run.generation_s:.1f} s)",
    ))
    session.report(Line(
        f"P6{suffix}", "wall/generation-at-ceiling", run.wall_s / at_ceiling, None,
        f"the whole command {run.wall_s:.1f} s vs {at_ceiling:.1f} s of generation at the ceiling; "
        f"the concurrency benchmark run {next((v for k, v in run.phases.items() if 'benchmark' in k), 0.0):.1f} s",
    ))


def report_sensor_run(session: Session, run, ceiling: float, suffix: str) -> None:
    log(
        f"P7{suffix}: {run.pages_changed} pages changed; the sensor requested {run.runs} run(s) "
        f"({run.ticks_with_runs} tick(s) with runs) covering {run.documents_in_runs} documents; {run.requests} "
        f"requests (cache misses), {run.output_tokens} output tokens in {run.duration_s:.1f} s from the tick "
        f"(at the ceiling: {run.output_tokens / ceiling:.1f} s); the generation itself (first request to last "
        f"answer) {run.generation_s:.1f} s = {run.output_tokens / max(run.generation_s, 1e-9) / ceiling:.3f} of the "
        f"ceiling, its slowest request {run.longest_request_s:.1f} s; the report sensor's refresh done "
        + ("not within 5 min" if run.report_after_s is None else f"{run.report_after_s:.1f} s after the last qa_pairs")
    )
    for name, seconds in run.phases.items():
        log(f"    {seconds:7.1f} s  {name}")
    session.figures[f"p7{suffix}"] = {
        "pages_changed": run.pages_changed, "runs": run.runs, "ticks_with_runs": run.ticks_with_runs,
        "documents_in_runs": run.documents_in_runs, "requests": run.requests, "output_tokens": run.output_tokens,
        "duration_s": run.duration_s, "generation_s": run.generation_s, "longest_request_s": run.longest_request_s,
        "report_after_s": run.report_after_s, "phases_s": run.phases,
    }
    session.report(Line(
        f"P7{suffix}", "achieved/ceiling", run.output_tokens_per_s / ceiling, 0.85 if not suffix else None,
        f"the sources sensor under dagster-daemon: {run.pages_changed} edited pages, {run.runs} run(s) requested "
        f"over {run.documents_in_runs} documents, {run.requests} chunks regenerated: {run.output_tokens_per_s:.0f} "
        f"output tok/s from the tick to the last qa_pairs materialization ({run.duration_s:.1f} s)",
    ))


def zero_latency_workload(session: Session) -> None:
    with start_simulator_process(**ZERO_LATENCY_PROFILE) as sim:
        n = session.sizes.p4_chunks
        server_cpu = process_cpu_s(sim.pid)
        run = run_generator(sim.base_url, session.tasks(n, "p4"), FixedLimit(64))
        server_cpu = process_cpu_s(sim.pid) - server_cpu
        per_chunk_us = run.cpu_s / n * 1e6
        log(
            f"P4: {n} chunks, queue {run.duration_s:.2f} s, whole Generator.run {run.wall_s:.2f} s; CPU per chunk: "
            f"client {per_chunk_us:.0f} us, simulator {server_cpu / n * 1e6:.0f} us"
        )
        session.figures["p4"] = {
            "chunks_per_s": n / run.wall_s, "queue_chunks_per_s": n / run.duration_s,
            "client_cpu_us_per_chunk": per_chunk_us, "simulator_cpu_us_per_request": server_cpu / n * 1e6,
        }
        session.report(Line(
            "P4", "chunks/s", n / run.wall_s, 2000,
            f"{n} chunks through client, validation and journal at concurrency 64 against a zero-latency "
            f"simulator, whole Generator.run; client CPU {per_chunk_us:.0f} us/chunk = "
            f"{1e6 / per_chunk_us:.0f} chunks/s per core",
        ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller workloads; indicative figures only")
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(ALL))
    parser.add_argument(
        "--documents-per-run", default="",
        help="P3 and P6/P7 again with QA_PIPELINE_DOCUMENTS_PER_RUN set to each of these values, e.g. 1,50 "
        "(figures for the record; the targets use the default)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="plots and JSON")
    args = parser.parse_args(argv)
    only = set((args.only or ",".join(ALL)).upper().split(","))
    unknown = only - set(ALL)
    if unknown:
        parser.error(f"unknown workloads {', '.join(sorted(unknown))}; choose among {', '.join(ALL)}")
    variants = [value.strip() for value in args.documents_per_run.split(",") if value.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(out=args.out, sizes=QUICK if args.quick else FULL)
    started = time.monotonic()
    with open("/proc/loadavg") as handle:
        load_before = handle.read().split()[:3]
    if only & {"P1", "P2", "P3", "P5"}:
        throughput_workloads(session, only)
    if "P3" in only:
        backfill_workload(session, variants)
    if "P4" in only:
        zero_latency_workload(session)
    if only & {"P6", "P7"}:
        doc_site_workload(session, only, variants)
    elapsed = time.monotonic() - started
    with open("/proc/loadavg") as handle:
        load_after = handle.read().split()[:3]
    targets = [line for line in session.lines if line.goal is not None]
    print(f"\n{len(targets)} targets, {sum(line.passed for line in targets)} passed, in {elapsed / 60:.1f} min "
          f"(load average before {' '.join(load_before)}, after {' '.join(load_after)})")
    print("\n| target | measure | value | goal | result | details |\n|---|---|---|---|---|---|")
    for line in session.lines:
        value = f"{line.value:.0f}" if line.value >= 100 else f"{line.value:.3f}"
        goal = "-" if line.goal is None else f">= {line.goal:g}"
        print(f"| {line.name} | {line.measure} | {value} | {goal} | {line.verdict} | {line.details} |")
    (args.out / "latest.json").write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "load_before": load_before, "load_after": load_after},
        "minutes": elapsed / 60,
        "lines": [line.text() for line in session.lines],
        "figures": session.figures,
    }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
