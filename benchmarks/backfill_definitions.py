"""Code location of benchmark P3: the project's `qa_pairs` asset and its checks, backfilled in one run.

With QA_PIPELINE_DOCUMENTS_PER_RUN=all (`BackfillPolicy.single_run()`) a backfill of many documents
is one run whose chunks share one work queue, so small documents keep the server busy together (a
run per document costs a Python process each, seconds of CPU per 20 chunks). Only `qa_pairs` is
loaded so the project's sensors and schedule, which sync partitions with a sources folder, leave
the benchmark's instance alone.
"""

import os

import dagster as dg

os.environ.setdefault("QA_PIPELINE_DOCUMENTS_PER_RUN", "all")

from qa_pipeline.defs.assets import qa_pairs  # noqa: E402  (the policy is read when the asset is defined)
from qa_pipeline.defs.checks import QA_PAIRS_CHECKS  # noqa: E402
from qa_pipeline.defs.resources import LLMResource, StorageResource  # noqa: E402

assert qa_pairs.backfill_policy is not None, "qa_pipeline.defs was imported before the policy was set"

defs = dg.Definitions(
    assets=[qa_pairs],
    asset_checks=QA_PAIRS_CHECKS,
    resources={"llm": LLMResource(), "storage": StorageResource()},
    executor=dg.in_process_executor,
)
