"""The stratified test sample of chunks that the concurrency benchmark runs on."""

from __future__ import annotations

import random

import polars as pl

NO_SERVICE = "(none)"


def stratified_sample(chunks: pl.DataFrame, size: int = 100, seed: int = 0) -> pl.DataFrame:
    """`size` chunks spread over strata, with a `stratum` column added.

    The stratum is the chunk's `service` when any chunk has one (chunks without one
    form the stratum "(none)"), else its `document`. Every stratum gets one chunk while
    `size` allows; the rest is shared in proportion to the strata's sizes (largest
    remainder). When `size` is below the number of strata, `size` strata chosen by the
    seed get one chunk each. The result depends only on the chunks and the seed, not on
    their row order, and is sorted by stratum and chunk_id.
    """
    if size < 0:
        raise ValueError(f"the sample size must be zero or more, got {size}")
    missing = {"chunk_id", "document"} - set(chunks.columns)
    if missing:
        raise ValueError(f"chunks need the columns {sorted(missing)} to be sampled; got {chunks.columns}")
    by_service = "service" in chunks.columns and chunks["service"].null_count() < chunks.height
    stratum = pl.col("service").fill_null(NO_SERVICE) if by_service else pl.col("document")
    ordered = chunks.with_columns(stratum.cast(pl.String).alias("stratum")).sort(["stratum", "chunk_id"])
    if size >= ordered.height:
        return ordered
    counts = ordered.group_by("stratum", maintain_order=True).len()
    strata: list[str] = counts["stratum"].to_list()
    sizes: list[int] = counts["len"].to_list()
    wanted = _allocate(strata, sizes, size, seed)
    rows: list[int] = []
    start = 0
    for name, stratum_size in zip(strata, sizes, strict=True):
        count = wanted.get(name, 0)
        if count:
            # One generator per stratum: adding chunks to one stratum leaves the picks
            # of the others alone unless their allocation changes.
            picked = random.Random(f"{seed}\0{name}").sample(range(stratum_size), count)
            rows.extend(start + offset for offset in sorted(picked))
        start += stratum_size
    return ordered[rows]


def _allocate(strata: list[str], sizes: list[int], size: int, seed: int) -> dict[str, int]:
    """How many chunks to take from each stratum (strata sorted by name)."""
    if size < len(strata):
        return dict.fromkeys(random.Random(seed).sample(strata, size), 1)
    wanted = dict.fromkeys(strata, 1)
    spare = [stratum_size - 1 for stratum_size in sizes]
    remaining = size - len(strata)
    total_spare = sum(spare)
    if remaining <= 0 or total_spare == 0:
        return wanted
    # Shares of the spare capacity stay below it (remaining < total_spare), so no stratum
    # is asked for more than it holds. Integer arithmetic keeps the remainders exact.
    floors = [remaining * capacity // total_spare for capacity in spare]
    remainders = [remaining * capacity % total_spare for capacity in spare]
    left = remaining - sum(floors)
    by_remainder = sorted(range(len(strata)), key=lambda index: (-remainders[index], strata[index]))
    for index in by_remainder[:left]:
        floors[index] += 1
    for name, extra in zip(strata, floors, strict=True):
        wanted[name] += extra
    return wanted
