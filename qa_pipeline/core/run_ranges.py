"""Which documents go into which run: ranges of partition keys, in the order the partitions were added.

A Dagster run over many partitions of one asset names a range (first and last key, in the
partitions' order), not a set. Documents that must run together are therefore cut into ranges.
"""

from __future__ import annotations

from collections.abc import Sequence

# The longest stretch of unselected documents a run spans to reach the next selected one. A spanned
# document costs no request, but Dagster records a `chunks` materialization for every partition of a
# run's range: about 13 ms each on the default SQLite instance, so 300 of them cost about 4 s, what a
# run's start costs on a quiet machine (a process that imports Dagster and the project). A longer
# stretch is cheaper as a run of its own: two edits 50,000 documents apart take two runs, not 50
# runs of 1,000 spanned documents.
MAX_SPANNED_GAP = 300


def partition_ranges(
    selected: Sequence[str], order: Sequence[str], per_run: int | None = None, max_gap: int = 0
) -> list[list[str]]:
    """The keys of each run, in `order`: runs of at most `per_run` documents (None: no limit), each
    beginning and ending with a selected key.

    A run covers the unselected documents between two of its selected ones when there are at most
    `max_gap` of them (0: never), so selected documents that are not next to each other share a run
    instead of taking one run per stretch; a longer gap starts another run.
    """
    wanted = set(selected)
    runs: list[list[str]] = []
    current: list[str] = []
    gap: list[str] = []
    for key in order:
        if key not in wanted:
            if current:
                gap.append(key)
            continue
        if len(gap) > max_gap:
            runs.append(current)
            current = []
        else:
            current.extend(gap)
        gap = []
        current.append(key)
    if current:
        runs.append(current)
    if per_run is None:
        return runs
    pieces = [run[i : i + per_run] for run in runs for i in range(0, len(run), per_run)]
    # A cut may fall inside a gap: a piece starts and ends with a selected key, and one without any is no run.
    return [trimmed for piece in pieces if (trimmed := _trim(piece, wanted))]


def _trim(keys: list[str], wanted: set[str]) -> list[str]:
    selected = [index for index, key in enumerate(keys) if key in wanted]
    return keys[selected[0] : selected[-1] + 1] if selected else []
