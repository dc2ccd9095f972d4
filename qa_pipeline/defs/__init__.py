"""Dagster definitions for qa_pipeline, loaded by `load_from_defs_folder`."""

from qa_pipeline.core.client import install_event_loop

# Before Dagster creates a run's event loop: the LLM client's requests run on uvloop.
install_event_loop()
