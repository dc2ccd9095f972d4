"""Dagster definitions for qa_pipeline, loaded by `load_from_defs_folder`."""
