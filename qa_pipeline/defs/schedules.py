"""The periodic check of the sources folder: the sensor's work on a cron, for when the sensor is stopped."""

import dagster as dg

from qa_pipeline.core.settings import RunSettings
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



def build_source_documents_schedule(settings: RunSettings) -> dg.ScheduleDefinition:
    """The schedule on the configured cron (QA_PIPELINE_SOURCES_CRON, default hourly)."""

    @dg.schedule(
        cron_schedule=settings.sources_cron,
        target=REGENERATION_TARGET,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=(
            f"Checks the sources folder on a cron ({settings.sources_cron}; QA_PIPELINE_SOURCES_CRON) even "
            "when `source_documents_sensor` is stopped: regenerates documents whose content differs from the "
            "one last requested or built, together in runs of many documents, and removes deleted ones."
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
        return regeneration_requests(changes, instance, layout, settings, run_keys=True)

    return source_documents_schedule


@dg.definitions
def schedule_definitions() -> dg.Definitions:
    return dg.Definitions(schedules=[build_source_documents_schedule(RunSettings.load())])
