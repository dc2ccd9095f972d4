"""Partitions: one dynamic partition per source document (its path under the sources folder)."""

import dagster as dg

documents = dg.DynamicPartitionsDefinition(name="documents")
