"""Scale benchmarks S1-S3 of issue 15: per-document costs at 1,000, 10,000 (and 100,000) documents.

    python benchmarks/scale.py                     # S1, S2, S3 at 1,000 and 10,000 documents
    python benchmarks/scale.py --only S2,S3 --large 100000
    python benchmarks/scale.py --quick             # 200 and 2,000: a smoke test, not the targets
    python benchmarks/scale.py --only DUP --before 761b696   # the report's duplicate search, and its speed-up

Each line reads `NAME measure=value target<=goal PASS|FAIL (details)`, as benchmarks/run.py prints;
the figures go to --out (default benchmarks/results/scale/latest.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402

from qa_pipeline.core.chunking import CHUNK_SCHEMA  # noqa: E402
from qa_pipeline.core.layout import DataLayout, Table  # noqa: E402
from qa_pipeline.core.quality import (  # noqa: E402
    SCORER_VERSION,
    QualityThresholds,
    find_duplicates,
    partition_verdicts,
    summarize_documents,
)
from qa_pipeline.core.report import build_report  # noqa: E402
from qa_pipeline.core.storage import TABLE_SCHEMAS, Storage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALL = ("S1", "S2", "S3")  # and DUP, on request

# What `qa-pipeline sql` is typically asked over a dataset: counts, shares and the worst documents.
AGGREGATE_QUERIES = (
    "SELECT count(*) AS pairs, count(DISTINCT document) AS documents FROM qa_pairs",
    "SELECT type, count(*) AS pairs, avg(latency_s) AS latency FROM qa_pairs GROUP BY type ORDER BY type",
    "SELECT document, count(*) AS chunks, sum(n_tokens) AS tokens FROM chunks GROUP BY document ORDER BY tokens DESC LIMIT 20",
    "SELECT reason, count(*) AS n FROM failures GROUP BY reason ORDER BY n DESC",
    "SELECT document, avg(groundedness) AS g FROM pair_scores GROUP BY document ORDER BY g LIMIT 20",
    "SELECT c.document, count(p.question) AS pairs FROM chunks c LEFT JOIN qa_pairs p USING (document, chunk_id) "
    "GROUP BY c.document ORDER BY pairs LIMIT 20",
)


def page_text(n: int) -> str:
    return (
        f"# Page {n}\n\n## Setup\n\nThis page {n} explains how to configure service {n % 37} with option {n}.\n\n"
        f"## Usage\n\nCall the endpoint {n} and read the answer; retries follow the policy of service {n % 37}.\n"
    )


def write_pages(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        (folder / f"section-{n // 1000:03d}" / f"page-{n:06d}.md").parent.mkdir(exist_ok=True)
        (folder / f"section-{n // 1000:03d}" / f"page-{n:06d}.md").write_text(page_text(n), encoding="utf-8")


def line(name: str, measure: str, value: float, goal: float | None, details: str) -> dict:
    verdict = "" if goal is None else (" PASS" if value <= goal else " FAIL")
    target = "" if goal is None else f" target<={goal:g}"
    print(f"{name} {measure}={value:.3f}{target}{verdict} ({details})", flush=True)
    return {"name": name, "measure": measure, "value": value, "goal": goal, "details": details}


def per_item_ratio(name: str, unit: str, sizes: tuple[int, int], seconds: tuple[float, float], what: str) -> dict:
    """The cost of one item at the larger size ÷ at the smaller: at most 1.2 (targets S1, S3)."""
    (small, large), (few, many) = sizes, seconds
    return line(name, f"per_{unit}_ratio", (many / large) / (few / small), 1.2, f"{what} per {unit} at {large} ÷ at {small}")


def per_item_lines(
    name: str, unit: str, sizes: tuple[int, int], seconds: tuple[float, float], details: tuple[str, str], what: str
) -> list[dict]:
    """The milliseconds per item at each size, then their ratio."""
    return [
        *(line(f"{name}@{size}", f"ms_per_{unit}", spent / size * 1000, None, detail)
          for size, spent, detail in zip(sizes, seconds, details, strict=True)),
        per_item_ratio(name, unit, sizes, seconds, what),
    ]


# --- S1: chunking through `qa-pipeline run --chunks-only` ------------------------------------------


def chunk_run(work: Path, pages: int) -> tuple[float, float]:
    """Wall and CPU seconds of one `qa-pipeline run --chunks-only` over `pages` new pages in a fresh data
    folder. CPU time is what a page costs on a machine shared with other work, where wall time also
    counts the waits for the other processes and the disk."""
    data = work / f"s1-{pages}"
    write_pages(data / "sources", pages)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QA_PIPELINE_", "DAGSTER_HOME"))}
    env["PYTHONPATH"] = str(REPO)
    started, cpu_before = time.perf_counter(), _children_cpu_s()
    result = subprocess.run(
        [sys.executable, "-m", "qa_pipeline.cli", "run", "--chunks-only", "--data-dir", str(data)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    seconds, cpu = time.perf_counter() - started, _children_cpu_s() - cpu_before
    if result.returncode != 0 or f"{pages} documents done" not in result.stdout:
        raise SystemExit(f"S1: qa-pipeline run --chunks-only over {pages} pages failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    shutil.rmtree(data)
    return seconds, cpu


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def s1(work: Path, small: int, large: int) -> list[dict]:
    (few, few_cpu), (many, many_cpu) = chunk_run(work, small), chunk_run(work, large)
    details = (f"{few:.1f} s wall, {few_cpu:.1f} s CPU for {small} pages", f"{many:.1f} s wall, {many_cpu:.1f} s CPU for {large} pages")
    return [
        *per_item_lines("S1", "page", (small, large), (few, many), details, "wall time"),
        per_item_ratio("S1/cpu", "page", (small, large), (few_cpu, many_cpu), "CPU time"),
    ]


# --- S2: queries, report and checks over per-document, compacted and single files ------------------


def synthetic_tables(documents: int) -> dict[str, pl.DataFrame]:
    """5 chunks, 15 QA pairs and their scores per document; a failed chunk in every tenth document."""
    now = datetime.now(UTC)
    doc = [f"section-{n // 1000:03d}/page-{n:06d}.md" for n in range(documents)]
    chunks = pl.DataFrame(
        {"document": doc}).join(pl.DataFrame({"position": list(range(5))}), how="cross").with_columns(
        chunk_id=pl.col("document") + "#" + pl.col("position").cast(pl.String),
        heading_path=pl.lit(["Page", "Setup"]),
        content=pl.lit("This page explains how to configure the service with an option and call the endpoint."),
        n_tokens=pl.lit(18),
        content_hash=pl.lit("0" * 16),
        service=pl.lit(None, pl.String),
        doc_type=pl.lit(None, pl.String),
        source_chunk_id=pl.lit(None, pl.String),
        metadata_json=pl.lit("{}"),
    ).select(list(CHUNK_SCHEMA)).cast(CHUNK_SCHEMA)
    pairs = chunks.select("document", "chunk_id").join(pl.DataFrame({"pair_index": [0, 1, 2]}), how="cross")
    pairs = pairs.with_columns(
        question=pl.format("How do I configure {} ({})?", "chunk_id", "pair_index"),
        answer=pl.lit("With the option described on the page."),
        type=pl.col("pair_index").replace_strict({0: "factual", 1: "procedural", 2: "conceptual"}),
        difficulty=pl.lit("easy"), evidence=pl.lit(["configure the service with an option"]),
        model=pl.lit("bench"), latency_s=pl.lit(1.5), prompt_tokens=pl.lit(300), completion_tokens=pl.lit(120),
        attempts=pl.lit(1), endpoint=pl.lit("http://127.0.0.1:8000/v1"), request_hash=pl.col("chunk_id"),
        prompt_version=pl.lit("v1"), generated_at=pl.lit(now),
    ).pipe(with_schema, Table.QA_PAIRS)
    failed = chunks.filter((pl.col("position") == 4) & (pl.col("document").str.slice(-5, 1) == "0"))
    failures = failed.select("document", "chunk_id").with_columns(
        reason=pl.lit("truncated"), detail=pl.lit("max_tokens"), http_status=pl.lit(200), attempts=pl.lit(1),
        model=pl.lit("bench"), endpoint=pl.lit("http://127.0.0.1:8000/v1"), latency_s=pl.lit(2.0),
        completion_tokens=pl.lit(512), request_hash=pl.col("chunk_id"), failed_at=pl.lit(now),
    ).cast(TABLE_SCHEMAS[Table.FAILURES])
    pairs = pairs.join(failed.select("chunk_id"), on="chunk_id", how="anti")
    scores = pairs.select("document", "chunk_id", "pair_index").with_columns(
        groundedness=0.6 + (pl.col("pair_index") * 0.15), content_terms=pl.lit(8),
        unsupported_numbers=pl.lit([], pl.List(pl.String)), unsupported_names=pl.lit([], pl.List(pl.String)),
        refusal=pl.lit(False), question_normalized=pl.lit("how configure"), duplicate_scope=pl.lit(None, pl.String),
        duplicate_of_chunk_id=pl.lit(None, pl.String), duplicate_of_pair_index=pl.lit(None, pl.Int32),
        duplicate_similarity=pl.lit(None, pl.Float64), question_words=pl.lit(6), answer_words=pl.lit(7),
        language=pl.lit("en"), chunk_language=pl.lit("en"), evidence_starts=pl.lit([25], pl.List(pl.Int32)),
        evidence_ends=pl.lit([61], pl.List(pl.Int32)), evidence_methods=pl.lit(["exact"]), evidence_not_found=pl.lit(0),
        evidence_score=pl.lit(1.0), scorer_version=pl.lit(SCORER_VERSION),
    ).pipe(with_schema, Table.PAIR_SCORES)
    return {Table.CHUNKS: chunks, Table.QA_PAIRS: pairs, Table.FAILURES: failures, Table.PAIR_SCORES: scores}


def with_schema(frame: pl.DataFrame, table: Table) -> pl.DataFrame:
    """The table's columns in order, typed; those the synthetic rows do not set are null (as in files
    written before a column existed), so a column added to a schema does not break the benchmark."""
    schema = TABLE_SCHEMAS[table]
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in schema.items() if name not in frame.columns]
    return frame.with_columns(missing).select(list(schema)).cast(schema)


def write_per_document(layout: DataLayout, tables: dict[str, pl.DataFrame]) -> None:
    """One file per document and table, where `Storage.write_partition` puts it (without its fsync)."""
    documents = tables[Table.CHUNKS]["document"].unique().to_list()
    for table, frame in tables.items():
        layout.table_dir(table).mkdir(parents=True, exist_ok=True)
        by_document = {key[0]: part for key, part in frame.partition_by("document", as_dict=True).items()}
        empty = frame.clear()
        for document in documents:
            by_document.get(document, empty).write_parquet(layout.partition_file(table, document))


def write_single_files(layout: DataLayout, tables: dict[str, pl.DataFrame]) -> None:
    """The reference: every table's rows in one Parquet file, read through the same views."""
    for table, frame in tables.items():
        layout.table_dir(table).mkdir(parents=True, exist_ok=True)
        frame.sort("document").write_parquet(layout.table_dir(table) / "all.parquet")


def best_of(runs: int, work: Callable[[], object]) -> float:
    return best_wall_and_cpu(runs, work)[0]


def best_wall_and_cpu(runs: int, work: Callable[[], object]) -> tuple[float, float]:
    """The shortest wall time and the shortest CPU time of this process among `runs` runs. On a shared
    machine the CPU time is the fairer figure: wall time also counts the waits for other processes."""
    walls, cpus = [], []
    for _ in range(runs):
        started, cpu_before = time.perf_counter(), time.process_time()
        work()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu_before)
    return min(walls), min(cpus)


def s2_workloads(layout: DataLayout, documents: list[str]) -> dict[str, Callable[[], object]]:
    """Each workload opens a new Storage, as a command does (the views are built each time)."""
    thresholds = QualityThresholds()

    def checks() -> None:
        for quality in summarize_documents(Storage(layout), documents, thresholds).values():
            partition_verdicts(quality, thresholds)

    return {
        "sql": lambda: [Storage(layout).query(sql) for sql in AGGREGATE_QUERIES],
        "report": lambda: build_report(Storage(layout)),
        "checks": checks,
    }


def s2(work: Path, documents: int, runs: int = 3, keep: bool = False) -> list[dict]:
    """With `keep`, the three data folders stay in `work` and a later run over the same `work` reuses them."""
    tables = synthetic_tables(documents)
    keys = tables[Table.CHUNKS]["document"].unique().sort().to_list()
    layouts = {name: DataLayout(root=work / f"s2-{documents}-{name}") for name in ("single", "per_document", "compacted")}
    if all(layout.root.exists() for layout in layouts.values()):
        return s2_queries(layouts, keys, runs, [])
    started = time.perf_counter()
    write_per_document(layouts["per_document"], tables)
    written = time.perf_counter() - started
    write_per_document(layouts["compacted"], tables)
    started = time.perf_counter()
    Storage(layouts["compacted"]).compact()
    compacted = time.perf_counter() - started
    write_single_files(layouts["single"], tables)
    rows = sum(frame.height for frame in tables.values())
    lines = [
        line(f"S2@{documents}", "compaction_s", compacted, None,
             f"{documents} documents x {len(tables)} tables, {rows} rows; writing the per-document files took {written:.1f} s"),
    ]
    lines = s2_queries(layouts, keys, runs, lines)
    if not keep:
        for layout in layouts.values():
            shutil.rmtree(layout.root)
    return lines


def s2_queries(layouts: dict[str, DataLayout], keys: list[str], runs: int, lines: list[dict]) -> list[dict]:
    """The reference first, then each layout's ratios as soon as they are measured."""
    documents = len(keys)
    reference = {name: best_of(runs, workload) for name, workload in s2_workloads(layouts["single"], keys).items()}
    for layout_name, goal in (("compacted", 3.0), ("per_document", None)):
        for name, workload in s2_workloads(layouts[layout_name], keys).items():
            value = best_of(runs, workload)
            lines.append(line(f"S2@{documents}/{name}/{layout_name}", "ratio_to_single_file", value / reference[name], goal,
                              f"{value:.3f} s vs {reference[name]:.3f} s over one file per table; best of {runs}"))
    return lines


# --- DUP: the report's duplicate-question search over S2's questions ------------------------------


def timed_duplicates(find: Callable[[list[str]], list], questions: list[str]) -> tuple[float, set[tuple]]:
    """CPU seconds (see best_wall_and_cpu) and the duplicates found."""
    started = time.process_time()
    found = find(questions)
    return time.process_time() - started, {(d.index, d.of, d.similarity) for d in found}


def quality_module_at(revision: str, folder: Path):  # noqa: ANN201 (a module)
    """`core/quality.py` as it was at a git revision, its imports resolved in this tree: the "before"."""
    source = subprocess.run(["git", "show", f"{revision}:qa_pipeline/core/quality.py"],
                            cwd=REPO, check=True, capture_output=True, text=True).stdout
    path = folder / f"quality_{revision}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def duplicates(work: Path, small: int, large: int, before: str | None) -> list[dict]:
    """`find_duplicates` over S2's templated questions (15 per document, in the report's order; most
    words shared by all, which made the earlier search quadratic); with `before`, that revision's
    search over the smaller set, side by side."""
    questions = {size: synthetic_tables(size)[Table.QA_PAIRS]["question"].to_list() for size in (small, large)}
    timed = {size: timed_duplicates(find_duplicates, questions[size]) for size in (small, large)}
    details = tuple(f"{timed[size][0]:.2f} s CPU for {len(questions[size])} questions, {len(timed[size][1])} duplicates"
                    for size in (small, large))
    lines = per_item_lines("DUP", "document", (small, large), (timed[small][0], timed[large][0]), details, "search (CPU time)")
    if before:
        then, found_then = timed_duplicates(quality_module_at(before, work).find_duplicates, questions[small])
        differ = len(found_then ^ timed[small][1])
        lines.append(line(f"DUP@{small}/before", "speedup", then / timed[small][0], None,
                          f"{before}: {then:.2f} s vs {timed[small][0]:.2f} s CPU now; "
                          f"{'the same duplicates' if not differ else f'{differ} rows differ'}"))
    return lines


# --- S3: the sources sensor's tick over unchanged documents ----------------------------------------


def sensor_ticks(work: Path, documents: int, ticks: int = 3) -> tuple[float, float, float]:
    """Seconds of the first tick (every file new to the stamps), and of the best later tick over unchanged
    files in wall and in CPU time."""
    import dagster as dg

    from qa_pipeline.core.settings import RunSettings
    from qa_pipeline.defs.partitions import documents as documents_partitions
    from qa_pipeline.defs.resources import StorageResource
    from qa_pipeline.defs.sensors import source_documents_tick

    data = work / f"s3-{documents}"
    write_pages(data / "sources", documents)
    layout = DataLayout(root=data)
    resource = StorageResource(data_dir=str(data))
    settings = RunSettings.load()
    (data / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(data / "dagster_home")) as instance:
        # The state after the pipeline acted on every document: partitions and the sensor's cursor.
        from qa_pipeline.core.documents import discover_documents

        hashes = {s.key: s.content_hash for s in discover_documents(layout.sources_dir)}
        instance.add_dynamic_partitions(documents_partitions.name, sorted(hashes))
        cursor = json.dumps(hashes, sort_keys=True)

        def tick() -> dg.SensorResult:
            context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": resource})
            result = source_documents_tick(context, resource, settings)
            if result.run_requests or result.dynamic_partitions_requests:
                raise SystemExit(f"S3: a tick over unchanged documents requested work: {result}")
            return result

        first = best_of(1, tick)
        later, later_cpu = best_wall_and_cpu(ticks, tick)
    shutil.rmtree(data)
    return first, later, later_cpu


def s3(work: Path, small: int, large: int) -> list[dict]:
    (first_few, few, few_cpu), (first_many, many, many_cpu) = sensor_ticks(work, small), sensor_ticks(work, large)
    details = tuple(f"tick {wall:.3f} s wall, {cpu:.3f} s CPU; first tick (hashing) {first:.2f} s"
                    for first, wall, cpu in ((first_few, few, few_cpu), (first_many, many, many_cpu)))
    return [
        *per_item_lines("S3", "document", (small, large), (few, many), details, "tick (wall time)"),
        per_item_ratio("S3/cpu", "document", (small, large), (few_cpu, many_cpu), "tick (CPU time)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated: S1,S2,S3,DUP")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--s1-large", type=int, default=None, help="S1's larger size (default: --large)")
    parser.add_argument("--quick", action="store_true", help="200 and 2,000 documents")
    parser.add_argument("--runs", type=int, default=3, help="S2: best of this many runs")
    parser.add_argument("--work", type=Path, default=None, help="S2: keep the data folders here (reused when present)")
    parser.add_argument("--before", default=None, help="DUP: also time this git revision's duplicate search")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale")
    args = parser.parse_args()
    small, large = (200, 2000) if args.quick else (args.small, args.large)
    only = {name.strip().upper() for name in args.only.split(",")}
    lines: list[dict] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qa-scale-") as folder:
        work = Path(folder)
        if "S3" in only:
            lines += s3(work, small, large)
        if "S2" in only:
            lines += s2(args.work or work, large, args.runs, keep=args.work is not None)
        if "S1" in only:
            lines += s1(work, small, args.s1_large or large)
        if "DUP" in only:
            lines += duplicates(work, small, large, args.before)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": os.getloadavg()},
        "lines": lines,
    }
    (args.out / "latest.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
