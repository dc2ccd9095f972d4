"""Pure-Python core of qa_pipeline: no Dagster import may appear in this package."""
