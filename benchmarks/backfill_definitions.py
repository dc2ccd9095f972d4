"""Code location of benchmark P3: the project's `qa_pairs` (its quality checks inline) as the project
loads it, so under the project's documents-per-run policy (QA_PIPELINE_DOCUMENTS_PER_RUN, default
1000: a backfill of 100 documents is one run). Only `qa_pairs` is loaded so the project's sensors and
schedule, which sync partitions with a sources folder, leave the benchmark's instance alone.
"""

import dagster as dg

from qa_pipeline.defs import assets as project_assets
from qa_pipeline.defs.resources import LLMResource, StorageResource

QA_PAIRS = dg.AssetKey("qa_pairs")

# The module, not its `assets_definitions`: Dagster would load a @definitions function found here.
qa_pairs = next(a for a in project_assets.assets_definitions().assets if isinstance(a, dg.AssetsDefinition) and QA_PAIRS in a.keys)

defs = dg.Definitions(
    assets=[qa_pairs],
    resources={"llm": LLMResource(), "storage": StorageResource()},
    executor=dg.in_process_executor,
)
