"""`python -m qa_pipeline.simulator [OPTIONS]` serves on loopback; `... batch IN OUT` answers a batch file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qa_pipeline.simulator.batch import run_batch
from qa_pipeline.simulator.config import add_simulator_arguments, config_from_args
from qa_pipeline.simulator.server import serve


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:
        batch = argparse.ArgumentParser(
            prog="python -m qa_pipeline.simulator batch",
            description="Answer a batch input file (JSONL) into a batch output file, as `vllm run-batch` does.",
        )
        batch.add_argument("input_file")
        batch.add_argument("output_file")
        add_simulator_arguments(batch)
        args = batch.parse_args(argv[1:])
        count = run_batch(args.input_file, args.output_file, config_from_args(args))
        print(f"{count} requests answered into {args.output_file}")
        return
    parser = argparse.ArgumentParser(
        prog="python -m qa_pipeline.simulator",
        description="Simulated vLLM OpenAI-compatible server with a capacity model and fault injection. "
        "`python -m qa_pipeline.simulator batch IN OUT` answers a batch file instead.",
    )
    add_simulator_arguments(parser)
    serve(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
