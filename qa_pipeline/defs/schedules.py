"""The periodic check of the sources folder: the sensor's work on a cron, for when the sensor is stopped."""

import os

import dagster as dg

from qa_pipeline.defs.resources import StorageResource
from qa_pipeline.defs.sensors import (
    REGENERATION_TARGET,
    apply_partition_changes,
    describe,
    refusal_to_empty,
    regeneration_requests,
    source_changes,
    source_observations,
)

SOURCES_CRON_ENV = "QA_PIPELINE_SOURCES_CRON"
DEFAULT_SOURCES_CRON = "0 * * * *"


@dg.schedule(
    cron_schedule=os.environ.get(SOURCES_CRON_ENV) or DEFAULT_SOURCES_CRON,
    target=REGENERATION_TARGET,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Checks the sources folder on a cron (${QA_PIPELINE_SOURCES_CRON}, default hourly) even when "
        "`source_documents_sensor` is stopped: regenerates documents whose content differs from the one "
        "last requested or built, removes deleted ones."
    ),
)
def source_documents_schedule(
    context: dg.ScheduleEvaluationContext, storage: StorageResource
) -> list[dg.RunRequest] | dg.SkipReason:
    """Same comparison as the sensor; with no cursor, it compares with the instance's records.

    A schedule cannot return partition requests or asset events, so it applies them to the
    instance before returning its run requests.
    """
    instance, layout = context.instance, storage.layout
    changes = source_changes(instance, layout, acted_on={})
    if refusal := refusal_to_empty(changes, layout):
        return dg.SkipReason(refusal)
    if not changes:
        return dg.SkipReason(describe(changes))
    apply_partition_changes(instance, layout, changes)
    for observation in source_observations(changes):
        instance.report_runless_asset_event(observation)
    context.log.info(describe(changes))
    return regeneration_requests(changes, run_keys=True)
