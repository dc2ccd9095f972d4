"""Partitions: one dynamic partition per source document (its path under the sources folder), and per
named model (QA_PIPELINE_MODELS_FILE) for the outputs kept per model."""

import dagster as dg

documents = dg.DynamicPartitionsDefinition(name="documents")
models = dg.DynamicPartitionsDefinition(name="models")
# Keys read "DOCUMENT|MODEL" (dimensions in name order); a range of documents for one model is a range.
documents_by_model = dg.MultiPartitionsDefinition({"documents": documents, "models": models})

# A run over several documents names the first and last key of its range (in the order the
# partitions were added): Dagster's documented tags for a single-run backfill.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def model_partition_key(document: str, model: str) -> str:
    """The key of one document's outputs from one named model."""
    return str(dg.MultiPartitionKey({"documents": document, "models": model}))


def split_model_partition_key(key: str) -> tuple[str, str]:
    """(document, model) of a `documents_by_model` key."""
    parts = documents_by_model.get_partition_key_from_str(key).keys_by_dimension
    return parts["documents"], parts["models"]
