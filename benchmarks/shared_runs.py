"""Several runs at once on one server: what a backfill with several documents per run and several
runs in flight does (QA_PIPELINE_DOCUMENTS_PER_RUN=N, `max_concurrent_runs` > 1).

Each run is its own process (as a Dagster run is) running the project's `Generator` over its
documents with its own limit. All of them start sending at the same moment (a start time handed to
each, after their imports), so the comparison measures the server's sharing, not process start-up.

    python -m benchmarks.shared_runs --worker BASE_URL START_AT FIRST_DOCUMENT DOCUMENTS CHUNKS LIMIT
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

from benchmarks.workloads import REPO, make_tasks, run_generator
from qa_pipeline.core.concurrency import AdaptiveLimit, FixedLimit

# Time for every worker process to import the project before the common start.
START_DELAY_S = 6.0


@dataclass
class SharedRuns:
    limit: str  # "auto" or a fixed level per run
    runs: int
    chunks: int
    output_tokens: int
    duration_s: float  # from the common start to the last run's end
    per_run_tokens_per_s: list[float]

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s


def run_shared(base_url: str, runs: int, documents_per_run: int, chunks_per_document: int, limit: str,
               first_document: int = 0) -> SharedRuns:
    """`runs` processes at once, each over its own `documents_per_run` documents, all with `limit`."""
    start_at = time.time() + START_DELAY_S
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.shared_runs", "--worker", base_url, repr(start_at),
             str(first_document + run * documents_per_run), str(documents_per_run), str(chunks_per_document), limit],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )
        for run in range(runs)
    ]
    results = []
    for worker in workers:
        output, _ = worker.communicate(timeout=1800)
        if worker.returncode != 0:
            raise RuntimeError(f"a shared-runs worker exited with {worker.returncode}")
        results.append(json.loads(output.strip().splitlines()[-1]))
    return SharedRuns(
        limit=limit,
        runs=runs,
        chunks=sum(r["chunks"] for r in results),
        output_tokens=sum(r["output_tokens"] for r in results),
        duration_s=max(r["ended"] for r in results) - start_at,
        per_run_tokens_per_s=[r["output_tokens"] / (r["ended"] - start_at) for r in results],
    )


def _worker(base_url: str, start_at: float, first_document: int, documents: int, chunks: int, limit: str) -> dict:
    tasks = [
        task
        for number in range(first_document, first_document + documents)
        for task in make_tasks(chunks, f"doc-{number:04d}.md", offset=number * chunks)
    ]
    limiter = AdaptiveLimit() if limit == "auto" else FixedLimit(int(limit))
    run = run_generator(base_url, tasks, limiter, start_at=start_at)
    return {"chunks": len(tasks), "output_tokens": run.output_tokens, "ended": run.ended_at}


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"]:
        sys.exit(__doc__)
    base_url, start_at, first, documents, chunks, limit = sys.argv[2:8]
    print(json.dumps(_worker(base_url, float(start_at), int(first), int(documents), int(chunks), limit)), flush=True)
