"""Entry point for `dagster dev` / `dg`: loads everything under qa_pipeline/defs."""

from pathlib import Path

import dagster as dg

from qa_pipeline.defs.loggers import console


@dg.definitions
def defs() -> dg.Definitions:
    # In-process execution: a run is one partition's few steps, so a process per step only adds start-up.
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=dg.in_process_executor, loggers={"console": console}),
    )
