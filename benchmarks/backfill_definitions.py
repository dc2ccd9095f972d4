"""Code location of benchmark P3: the project's `qa_pairs` asset alone, backfilled in a single run.

With `BackfillPolicy.single_run()` a backfill of many documents is one run whose chunks share one
work queue, so small documents keep the server busy together (a run per document costs a Python
process each, seconds of CPU per 20 chunks). Only `qa_pairs` is loaded so the project's sensors and
schedule, which sync partitions with a sources folder, leave the benchmark's instance alone.
"""

import dagster as dg

from qa_pipeline.defs.assets import qa_pairs
from qa_pipeline.defs.resources import LLMResource, StorageResource

qa_pairs_single_run = qa_pairs.with_attributes(backfill_policy=dg.BackfillPolicy.single_run())

defs = dg.Definitions(
    assets=[qa_pairs_single_run],
    resources={"llm": LLMResource(), "storage": StorageResource()},
    executor=dg.in_process_executor,
)
