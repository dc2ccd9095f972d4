"""Issue 15, memory: peak RSS of `qa-pipeline run`'s chunks and qa_pairs steps on one plain-text document
of 6 MB and of 60 MB, and their ratio (target: the 60 MB peak at most 1.5 x the 6 MB peak).

    python benchmarks/memory.py                 # 6 MB and 60 MB
    python benchmarks/memory.py --sizes-mb 1,10 # a quicker pair (the ratio is then of these two)

Each size runs the default path as a user starts it (`qa-pipeline run`, a subprocess, on a fresh data
folder) against a simulator process tuned to answer fast; `--skip-benchmark --concurrency N` keeps the
sweep out of the figure, and the run is stopped when the report (over the whole dataset, not this target)
starts. RSS is sampled every 50 ms over the run's process tree; the step is read from the run's own log lines.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.doc_site_run import clean_environment  # noqa: E402
from benchmarks.workloads import REPO  # noqa: E402
from qa_pipeline.simulator.process import start_simulator_process  # noqa: E402

# Short answers from a wide batch: ~67,000 requests finish in minutes, bound by the client's CPU.
FAST_PROFILE = {
    "max_num_seqs": 512,
    "step_base_ms": 2.0,
    "step_per_seq_ms": 0.01,
    "output_tokens_mean": 24.0,
    "output_tokens_min": 8,
    "output_tokens_max": 32,
}
CONCURRENCY = 128
TARGET_RATIO = 1.5
# Log lines that start a step (stdout and stderr of `qa-pipeline run`, merged, unbuffered).
PHASES = (
    ("chunks: starting a run", "chunks"),
    ("qa_pairs: starting a run", "qa_pairs"),
    ("quality_report", "report"),
)

_SYLLABLES = "ka lo mi ne ru sa te vo pi da re fo gu ha ji ku le mo na po qui ri so tu va we xi yo za".split()


def _vocabulary(size: int, rng: random.Random) -> list[str]:
    """Made-up words of two to four syllables: a wide vocabulary, so the simulator's questions (a template
    around a phrase of the passage) differ, as a real document's do; a few dozen words would make them
    near-duplicates, and the duplicate search over a document (the same before and after) quadratic."""
    words = {"".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(size)}
    return sorted(words)


def write_document(path: Path, size_bytes: int, seed: int = 0) -> None:
    """Plain text of about `size_bytes`: paragraphs of three to eight sentences, each paragraph distinct."""
    rng = random.Random(seed)
    words = _vocabulary(20_000, rng)
    written = 0
    with path.open("w", encoding="utf-8") as handle:
        number = 0
        while written < size_bytes:
            number += 1
            sentences = []
            for _ in range(rng.randint(3, 8)):
                sentence = rng.choices(words, k=rng.randint(8, 20))
                sentences.append(" ".join(sentence).capitalize() + ".")
            paragraph = f"Paragraph {number}. " + " ".join(sentences) + "\n\n"
            handle.write(paragraph)
            written += len(paragraph)


@dataclass
class Sampler:
    """Peak RSS of a process and its children, per step, sampled every `interval_s`."""

    pid: int
    interval_s: float = 0.05
    phase: str = "start"
    peaks: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        root = psutil.Process(self.pid)
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                rss = 0
            now = time.monotonic()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - last
            last = now
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop.set()


def measure(size_mb: float, base_url: str, log_dir: Path) -> Sampler:
    """One fresh `qa-pipeline run` over one document of `size_mb` MB; its sampler."""
    with TemporaryDirectory(prefix="qa-memory-") as folder:
        root = Path(folder)
        sources = root / "data" / "sources"
        sources.mkdir(parents=True)
        write_document(sources / "big.txt", int(size_mb * 1_000_000))
        log_path = log_dir / f"memory-{size_mb:g}mb.log"
        # This checkout's qa_pipeline, as `qa-pipeline` would run it.
        command = [sys.executable, "-m", "qa_pipeline.cli", "run", "--skip-benchmark"]
        command += ["--concurrency", str(CONCURRENCY)]
        env = clean_environment(QA_PIPELINE_LLM_BASE_URL=base_url, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        with log_path.open("w", buffering=1) as log:
            process = subprocess.Popen(
                command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            sampler = Sampler(process.pid)
            thread = threading.Thread(target=sampler.run, daemon=True)
            thread.start()
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                for marker, phase in PHASES:
                    if marker in line:
                        sampler.phase = phase
                if sampler.phase == "report":
                    # The qa_pairs step is over; the report (every document's outputs) is not this target.
                    process.kill()
                    break
            code = 0 if sampler.phase == "report" else process.wait()
            process.wait()
            sampler.stop()
            thread.join()
        if code != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
            raise SystemExit(f"qa-pipeline run on {size_mb:g} MB exited with {code}; see {log_path}:\n{tail}")
        chunks = sum(1 for _ in (root / "data" / "journal").glob("*.jsonl") for _ in _.open())
        print(f"  {size_mb:g} MB: {chunks} chunks answered; log in {log_path}", flush=True)
    return sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", default="6,60", help="two document sizes, small then large (MB)")
    parser.add_argument("--logs", default="benchmarks/results", help="folder for the runs' logs")
    args = parser.parse_args()
    small, large = (float(s) for s in args.sizes_mb.split(","))
    log_dir = Path(args.logs)
    log_dir.mkdir(parents=True, exist_ok=True)
    peaks: dict[float, Sampler] = {}
    with start_simulator_process(**FAST_PROFILE) as simulator:
        print(f"simulator {FAST_PROFILE}, concurrency {CONCURRENCY}", flush=True)
        for size in (small, large):
            peaks[size] = measure(size, simulator.openai_base_url, log_dir)
            print(f"  {size:g} MB: peak RSS by step (MB) {_in_mb(peaks[size].peaks)}", flush=True)
    mb = 1024 * 1024
    for size, sampler in peaks.items():
        steps = ", ".join(
            f"{phase} {sampler.peaks[phase] / mb:,.0f} MB ({sampler.seconds[phase]:.0f} s)"
            for _, phase in PHASES if phase in sampler.peaks
        )
        print(f"{size:g} MB document: peak RSS {steps}")
    for _, phase in PHASES[:2]:
        ratio = peaks[large].peaks[phase] / peaks[small].peaks[phase]
        verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
        print(
            f"M1 {phase} peak RSS {large:g} MB / {small:g} MB = {ratio:.2f} target<={TARGET_RATIO} {verdict} "
            f"({peaks[large].peaks[phase] / mb:,.0f} MB vs {peaks[small].peaks[phase] / mb:,.0f} MB)"
        )


def _in_mb(figures: dict[str, int]) -> dict[str, int]:
    return {phase: round(value / 1024 / 1024) for phase, value in figures.items()}


if __name__ == "__main__":
    main()
