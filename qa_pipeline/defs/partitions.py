"""Partitions: one dynamic partition per source document (its path under the sources folder)."""

import dagster as dg

documents = dg.DynamicPartitionsDefinition(name="documents")

# A run over several documents names the first and last key of its range (in the order the
# partitions were added): Dagster's documented tags for a single-run backfill.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
