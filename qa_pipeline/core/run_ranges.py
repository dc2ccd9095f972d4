"""Which documents go into which run: ranges of partition keys, in the order the partitions were added.

A Dagster run over many partitions of one asset names a range (first and last key, in the
partitions' order), not a set. Documents that must run together are therefore cut into ranges.
"""

from __future__ import annotations

from collections.abc import Sequence


def partition_ranges(
    selected: Sequence[str], order: Sequence[str], per_run: int | None = None, span_gaps: bool = False
) -> list[list[str]]:
    """The keys of each run, in `order`: runs of at most `per_run` documents (None: no limit).

    Without `span_gaps`, a run holds only selected keys, so selected documents that are not next to
    each other in `order` take several runs. With `span_gaps`, a run covers everything between its
    first and last selected key: the documents in between are published again from their cache (no
    request), which is cheaper than a run of its own for each stretch of changed documents.
    """
    wanted = set(selected)
    runs: list[list[str]] = []
    current: list[str] = []
    pending_gap: list[str] = []
    for key in order:
        if key not in wanted:
            if current and span_gaps:
                pending_gap.append(key)
            elif current:
                runs.append(current)
                current = []
            continue
        current.extend(pending_gap)
        pending_gap = []
        current.append(key)
    if current:
        runs.append(current)
    if per_run is None:
        return runs
    return [run[i : i + per_run] for run in runs for i in range(0, len(run), per_run)]
