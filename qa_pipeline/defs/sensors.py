"""Change-driven regeneration: new and changed documents regenerate their own partition, deleted ones
lose theirs, and the report follows. The folder→partitions sync shared with `qa-pipeline run` is here too.
"""

import dataclasses
import fnmatch
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from qa_pipeline.core.chunking import document_problem
from qa_pipeline.core.documents import SourceChanges, compare_sources
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.run_ranges import MAX_SPANNED_GAP, partition_ranges
from qa_pipeline.core.settings import RunSettings
from qa_pipeline.core.registry import plan_deletions, record_added, record_deleted
from qa_pipeline.core.storage import Storage
from qa_pipeline.defs.assets import chunks, qa_pairs, quality_report, source_documents
from qa_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, documents
from qa_pipeline.defs.resources import StorageResource

# Every run started by change detection carries this tag (the CLI's runs carry launched_by=cli), so
# the run queue can limit them: see `tag_concurrency_limits` in deploy/dagster-dev.yaml.
LAUNCHED_BY_TAG = "qa_pipeline/launched_by"
SOURCE_CHANGE = "source_change"
CONTENT_HASH_TAG = "qa_pipeline/content_hash"

# By key: the loaded definitions hold copies of these assets with the configured backfill policy.
REGENERATION_TARGET = dg.AssetSelection.assets(chunks.key, qa_pairs.key)

# Dagster records an asset event's data version under this tag (and indexes it per partition).
_DATA_VERSION_TAG = "dagster/data_version"


def source_changes(
    instance: dg.DagsterInstance, layout: DataLayout, acted_on: Mapping[str, str] | None = None
) -> SourceChanges:
    """How the sources folder differs from the instance's partitions and from `acted_on` (key → hash).

    A partition missing from `acted_on` falls back to what the instance recorded: the hash last
    observed for `source_documents` or the one its `chunks` were built from (`qa-pipeline run`
    records only the latter), so a lost cursor does not regenerate everything. With `acted_on`
    None only partitions are compared.
    """
    present = {source.key: source.content_hash for source in layout.discover_sources()}
    partitions = instance.get_dynamic_partitions(documents.name)
    if acted_on is None:
        return compare_sources(present, partitions)
    unknown = [key for key in partitions if key in present and key not in acted_on]
    return compare_sources(present, partitions, {**_recorded_hashes(instance, unknown, present), **acted_on})


@dataclass(frozen=True)
class SyncResult:
    """What a sync did: partitions added, documents moved to the trash, documents kept, and why."""

    added: tuple[str, ...]
    removed: tuple[str, ...]  # their outputs and journals are in `trash`
    kept: tuple[str, ...]  # not in the sources folder, but not deleted: see `notice`
    trash: Path | None = None
    notice: str | None = None

    @property
    def messages(self) -> list[str]:
        """Lines for the user: counts, where deleted documents went, why others were kept."""
        lines = []
        if self.added or self.removed:
            lines.append(f"documents: {len(self.added)} new, {len(self.removed)} removed")
        if self.trash is not None:
            lines.append(f"their outputs and journals were moved to {self.trash} (move them back to restore)")
        if self.notice:
            lines.append(self.notice)
        return lines


def sync_document_partitions(
    instance: dg.DagsterInstance, layout: DataLayout, *, deletions_allowed: bool = True
) -> SyncResult:
    """The CLI's sync: adds a partition per new document; removes the partition of a document gone from
    the folder it was registered from, moving its outputs to the trash, when `deletions_allowed` and the
    folder is not empty. Documents missing from another or an empty folder are kept (`SyncResult.notice`).
    """
    changes = source_changes(instance, layout)
    plan = plan_deletions(layout, changes.removed, len(changes.hashes), deletions_allowed=deletions_allowed)
    trash = apply_partition_changes(instance, layout, dataclasses.replace(changes, removed=plan.deleted))
    return SyncResult(changes.added, plan.deleted, plan.kept, trash, plan.notice)


def apply_partition_changes(instance: dg.DagsterInstance, layout: DataLayout, changes: SourceChanges) -> Path | None:
    """Adds and removes partitions as `changes` says (the caller has checked the removals); the trash
    folder the removed documents' files went to, if any."""
    if changes.added:
        instance.add_dynamic_partitions(documents.name, list(changes.added))
        record_added(layout, changes.added)
    for key in changes.removed:
        instance.delete_dynamic_partition(documents.name, key)
    return delete_outputs(layout, changes.removed)


def delete_outputs(layout: DataLayout, keys: Sequence[str]) -> Path | None:
    """Moves the Parquet files and journal of deleted documents into one trash folder, so their rows
    leave the DuckDB views and their paid responses can be restored; that folder, if anything moved."""
    storage, trash = Storage(layout), None
    for key in keys:
        trash = storage.delete_partition(key, trash) or trash
    record_deleted(layout, keys)
    if trash is not None:
        dg.get_dagster_logger().info(f"moved the outputs and journals of {len(keys)} documents to {trash}")
    return trash


def forget_documents(instance: dg.DagsterInstance, layout: DataLayout, patterns: Sequence[str]) -> SyncResult:
    """Deliberately deletes the documents whose keys match a glob, wherever they came from: partitions
    removed, outputs and journals moved to the trash. A document still in its folder is added back by the
    next sync."""
    keys = tuple(
        key
        for key in sorted(instance.get_dynamic_partitions(documents.name))
        if any(fnmatch.fnmatch(key, pattern) for pattern in patterns)
    )
    trash = apply_partition_changes(instance, layout, SourceChanges(added=(), changed=(), removed=keys, hashes={}))
    return SyncResult(added=(), removed=keys, kept=(), trash=trash)


def refusal_to_empty(changes: SourceChanges, layout: DataLayout) -> str | None:
    """Why an unattended tick must not delete the documents missing from the folder, or None.

    It refuses an empty folder (unmounted or emptied, it would erase the dataset), a folder other than
    the one the missing documents were registered from, and a dataset with no recorded folder; the
    first tick that sees documents and none missing records the folder.
    """
    plan = plan_deletions(layout, changes.removed, len(changes.hashes))
    return plan.notice if plan.kept else None


def regeneration_requests(
    changes: SourceChanges,
    instance: dg.DagsterInstance,
    layout: DataLayout,
    settings: RunSettings,
    run_keys: bool = False,
) -> list[dg.RunRequest]:
    """Runs of `chunks` + `qa_pairs` over the new and changed documents together (`quality_report_sensor`
    follows), up to `settings.documents_per_run` documents a run.

    A run names a range of partitions, so it spans the unchanged documents between two changed
    ones: the run's config lists them (`span_only_documents`), and each whose outputs are newer than its
    inputs is skipped (no chunking, journal read or request; only the `chunks` materialization Dagster
    records for every partition of the range), which costs far less than a run per stretch of changed
    documents, up to `MAX_SPANNED_GAP` unchanged documents in a row; past that, the next changed
    document starts another run. A document that cannot be read gets a run of its own, so that it
    fails alone instead of holding back the others' generation.
    """
    unreadable = set(unreadable_documents(layout, changes.to_generate))
    order = [key for key in instance.get_dynamic_partitions(documents.name) if key not in changes.removed]
    order += [key for key in changes.added if key not in order]
    per_run = None if settings.documents_per_run == "all" else settings.documents_per_run
    groups = partition_ranges([k for k in changes.to_generate if k not in unreadable], order, per_run, max_gap=MAX_SPANNED_GAP)
    groups += [[key] for key in changes.to_generate if key in unreadable]
    requests = []
    for keys in groups:
        generated = [key for key in keys if key in changes.hashes and key in set(changes.to_generate)]
        digest = hashlib.sha256(
            json.dumps({key: changes.hashes[key] for key in generated}, sort_keys=True).encode("utf-8")
        ).hexdigest()[:16]
        tags = {LAUNCHED_BY_TAG: SOURCE_CHANGE, CONTENT_HASH_TAG: digest}
        if len(keys) == 1:
            requests.append(
                dg.RunRequest(run_key=f"{keys[0]}@{digest}" if run_keys else None, asset_selection=[chunks.key, qa_pairs.key], partition_key=keys[0], tags=tags)
            )
        else:
            tags.update({RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]})
            requested = set(generated)
            spanned = {"span_only_documents": [key for key in keys if key not in requested]}
            requests.append(
                dg.RunRequest(
                    run_key=f"{keys[0]}..{keys[-1]}@{digest}" if run_keys else None,
                    asset_selection=[chunks.key, qa_pairs.key],
                    tags=tags,
                    run_config={"ops": {"chunks": {"config": spanned}, "qa_pairs": {"config": spanned}}}
                    if spanned["span_only_documents"] else {},
                )
            )
    return requests


def unreadable_documents(layout: DataLayout, keys: Sequence[str]) -> list[str]:
    """The documents among `keys` that cannot be read or chunked (bad encoding, binary, empty...)."""
    if not keys:
        return []
    sources = {key: layout.source_file(key) for key in keys}
    return [key for key, source in sources.items() if source is not None and document_problem(source) is not None]


def source_observations(changes: SourceChanges) -> list[dg.AssetObservation]:
    """The content hash of each new or changed document, as the data version of its `source_documents`."""
    return [
        dg.AssetObservation(
            asset_key=source_documents.key,
            partition=key,
            tags={_DATA_VERSION_TAG: changes.hashes[key]},
            metadata={"content_hash": changes.hashes[key]},
        )
        for key in changes.to_generate
    ]


def describe(changes: SourceChanges) -> str:
    parts = [
        f"{len(keys)} {label} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"
        for label, keys in (("new", changes.added), ("changed", changes.changed), ("deleted", changes.removed))
        if keys
    ]
    return "documents: " + "; ".join(parts) if parts else "no document changed"


def build_source_documents_sensor(settings: RunSettings) -> dg.SensorDefinition:
    """The sources sensor, ticking every QA_PIPELINE_SOURCES_SENSOR_INTERVAL_S seconds (default 60)."""

    @dg.sensor(
        name="source_documents_sensor",
        target=REGENERATION_TARGET,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=settings.sources_sensor_interval_s,
        description=(
            "Hashes every file under the sources folder: new and changed documents regenerate their "
            "partitions together, in runs of many documents (chunks, qa_pairs; the cache makes unchanged "
            "chunks free); a deleted one loses its partition and outputs. Interval: "
            f"{settings.sources_sensor_interval_s} s (QA_PIPELINE_SOURCES_SENSOR_INTERVAL_S)."
        ),
    )
    def sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
        return source_documents_tick(context, storage, settings)

    return sensor


def source_documents_tick(
    context: dg.SensorEvaluationContext, storage: StorageResource, settings: RunSettings
) -> dg.SensorResult:
    """Observes the folder by content hash, with a cursor of key → hash the pipeline last acted on.

    Why a sensor with a cursor rather than declarative automation on the observable
    `source_documents`: only a sensor (or code holding the instance) can add and delete dynamic
    partitions, so one is needed anyway, and the cursor makes a tick request exactly the new and
    changed documents. Touching a file changes its mtime, not its hash, and requests nothing; a
    document whose run fails is requested once per content change, not on every tick. Each request
    is also recorded as an observation of `source_documents` (data version = content hash), so the
    UI shows each document's version and marks its outputs stale until the run lands, and the
    schedule, which has no cursor, knows what was already requested.
    """
    layout = storage.layout
    acted_on = json.loads(context.cursor) if context.cursor else {}
    changes = source_changes(context.instance, layout, acted_on)
    if refusal := refusal_to_empty(changes, layout):
        return dg.SensorResult(skip_reason=refusal)
    # Deleted before the partition is: a tick that fails in between deletes them again next time.
    delete_outputs(layout, changes.removed)
    if changes:
        context.log.info(describe(changes))
    return dg.SensorResult(
        run_requests=regeneration_requests(changes, context.instance, layout, settings),
        skip_reason=None if changes else describe(changes),
        dynamic_partitions_requests=[
            *([documents.build_add_request(list(changes.added))] if changes.added else []),
            *([documents.build_delete_request(list(changes.removed))] if changes.removed else []),
        ],
        asset_events=source_observations(changes),
        cursor=json.dumps(dict(changes.hashes), sort_keys=True),
    )


@dg.sensor(
    target=dg.AssetSelection.assets(quality_report.key),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Refreshes `quality_report` when `qa_pairs` has landed since the last report or documents were "
        "deleted, once no run writing `qa_pairs` or the report is queued or running."
    ),
)
def quality_report_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Compares event-log positions (latest `qa_pairs` vs latest report) instead of reacting to updates
    between two ticks, so a `qa_pairs` partition landing while a report is written is never lost (an
    `any_deps_updated().since_last_handled()` automation condition loses it). The cursor is a digest
    of the documents the last report saw: a deletion changes it without any new `qa_pairs`.
    """
    instance = context.instance
    documents_now = _digest(instance.get_dynamic_partitions(documents.name))
    generated, reported = _latest_storage_id(instance, qa_pairs), _latest_storage_id(instance, quality_report)
    documents_changed = context.cursor is not None and context.cursor != documents_now
    if not (generated > reported or (documents_changed and generated)):
        return dg.SensorResult(skip_reason="the report is up to date", cursor=documents_now)
    if _writes_in_flight(instance):
        return dg.SensorResult(skip_reason="waiting for runs that write qa_pairs or the report", cursor=context.cursor)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(asset_selection=[quality_report.key], tags={LAUNCHED_BY_TAG: SOURCE_CHANGE})],
        cursor=documents_now,
    )


_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _writes_in_flight(instance: dg.DagsterInstance) -> bool:
    watched = {qa_pairs.key, quality_report.key}
    return any(
        run.asset_selection is None or run.asset_selection & watched
        for run in instance.get_runs(dg.RunsFilter(statuses=_IN_FLIGHT))
    )


def _latest_storage_id(instance: dg.DagsterInstance, asset: dg.AssetsDefinition) -> int:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset.key), limit=1).records
    return records[0].storage_id if records else 0


def _digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()


def _recorded_hashes(instance: dg.DagsterInstance, keys: Sequence[str], present: Mapping[str, str]) -> dict[str, str]:
    if not keys:
        return {}
    event_log = instance.event_log_storage
    recorded = [
        event_log.get_latest_tags_by_partition(asset.key, event_type, [_DATA_VERSION_TAG], asset_partitions=list(keys))
        for asset, event_type in (
            (source_documents, dg.DagsterEventType.ASSET_OBSERVATION),
            (chunks, dg.DagsterEventType.ASSET_MATERIALIZATION),
        )
    ]
    known = {}
    for key in keys:
        versions = [by_key[key][_DATA_VERSION_TAG] for by_key in recorded if _DATA_VERSION_TAG in by_key.get(key, {})]
        if versions:
            # Either record counts: requested (observed) at this content, or built from it.
            known[key] = present[key] if present[key] in versions else versions[0]
    return known


@dg.definitions
def sensor_definitions() -> dg.Definitions:
    return dg.Definitions(sensors=[build_source_documents_sensor(RunSettings.load()), quality_report_sensor])
