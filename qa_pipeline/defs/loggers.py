"""The console logger of the project's runs: Dagster's own, without the stack trace of a deliberate failure."""

import logging

import dagster as dg


def _deliberate(event) -> bool:
    """Whether a step failure, or a run failure whose first failed step, raised `dg.Failure`."""
    if event is None:
        return False
    if event.is_step_failure:
        return event.step_failure_data.user_failure_data is not None
    if event.is_run_failure:
        first = getattr(event.event_specific_data, "first_step_failure_event", None)
        return first is not None and _deliberate(first)
    return False


class _DeliberateFailuresWithoutTrace(logging.Filter):
    """A step that raised `dg.Failure` (a document over its failure threshold, a blocking check that
    failed) says why in its message; its stack trace only shows where the project raised it, and on a
    console it reads like a crash. The run's event log in the UI keeps the whole error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _deliberate((getattr(record, "dagster_meta", None) or {}).get("dagster_event")):
            record.msg = str(record.msg).split("\nStack Trace:", 1)[0].rstrip()
        return True


@dg.logger(
    config_schema=dg.colored_console_logger.config_schema,
    description="Dagster's colored console logger; a deliberate step failure is shown without its stack trace.",
)
def console(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = dg.colored_console_logger.logger_fn(init_context)
    logger.addFilter(_DeliberateFailuresWithoutTrace())
    return logger
