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
        # Positional IN OUT, or `vllm run-batch`'s own form: -i IN -o OUT --model NAME.
        batch.add_argument("input_file", nargs="?")
        batch.add_argument("output_file", nargs="?")
        batch.add_argument("-i", "--input-file", dest="input_flag")
        batch.add_argument("-o", "--output-file", dest="output_flag")
        batch.add_argument("--model", help="a model name to serve too, as vllm run-batch --model")
        add_simulator_arguments(batch)
        args = batch.parse_args(argv[1:])
        input_file, output_file = args.input_flag or args.input_file, args.output_flag or args.output_file
        if not input_file or not output_file:
            batch.error("give the input and output files (IN OUT, or -i IN -o OUT)")
        config = config_from_args(args)
        if args.model and args.model not in config.served_model_name:
            config = config.model_copy(update={"served_model_name": [*config.served_model_name, args.model]})
        count = run_batch(input_file, output_file, config)
        print(f"{count} requests answered into {output_file}")
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
