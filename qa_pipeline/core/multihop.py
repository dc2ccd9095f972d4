"""Multi-hop questions: groups of two or three related chunks of one document, the request asking one
question that needs all of them, and its rows with the evidence of each hop located in that hop's chunk.

Chunks are related when they sit in the same section (a shared heading path) or share rare terms (words
that only two or three chunks of the document use); see docs/multihop.md for the rules and why.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from typing import ClassVar

import polars as pl

from qa_pipeline.core.evidence import ChunkText, locate_evidence
from qa_pipeline.core.generation import ChunkTask, GenerationSettings
from qa_pipeline.core.layout import Table
from qa_pipeline.core.prompts import (
    MULTIHOP_PROMPT_VERSION,
    MultiHopPair,
    build_multihop_messages,
    multihop_schema,
    parse_multihop_pair,
)
from qa_pipeline.core.quality import (
    STOPWORDS,
    PartitionQuality,
    QualityThresholds,
    Verdict,
    evidence_verdict,
    success_rate_verdict,
)
from qa_pipeline.core.storage import MULTIHOP_PAIRS_SCHEMA, ChunkResult, ResultTables, Storage, results_to_frames

# A term is rare when at most this many chunks of the document use it (and at least two: it links them).
RARE_TERM_MAX_CHUNKS = 3
# Two chunks of different sections are related when they share at least this many rare terms.
MIN_SHARED_TERMS = 2
# A shared section counts as much as this many shared rare terms when ranking candidate groups.
HEADING_WEIGHT = 2
# Chunks of one section are linked when at most this many positions apart (and at least two, see
# `related_groups`): a long section links each chunk to a few near ones, not to all of them.
SECTION_WINDOW = 3
MAX_HOPS = 3
GROUP_SEPARATOR = "+"

_TERM = re.compile(r"[A-Za-z][A-Za-z0-9_]{3,}")
STOPWORDS_ANY_LANGUAGE = frozenset().union(*STOPWORDS.values())
# Words frequent in any prose: sharing them says nothing about two passages.
_COMMON = STOPWORDS_ANY_LANGUAGE | frozenset(
    """about above after again also although among another anything because been before being below
    between both called cannot case cases could didn does doesn doing done down during each either else
    even every example following from further general given good have having here however into isn
    itself just less like likely look looks made make makes many more most much must need never note
    often only other others over please point read really same seem seems should since some something
    such than that their them then there these they thing things think this those through under until
    upon used uses using very wasn well were what when where whether which while will with within
    without work would write your""".split()
)


@dataclass(frozen=True)
class HopGroup:
    """Two or three related chunks of one document, in document order, and why they were grouped."""

    document: str
    chunk_ids: tuple[str, ...]
    linked_by: str  # "heading", "terms" or "heading+terms"
    shared_terms: tuple[str, ...]

    @property
    def group_id(self) -> str:
        return GROUP_SEPARATOR.join(self.chunk_ids)


@dataclass(frozen=True)
class Hop:
    chunk_id: str
    content: str
    heading_path: tuple[str, ...]


@dataclass(frozen=True)
class HopTask(ChunkTask):
    """One group to ask about: `chunk_id` is the group id (the journal's key), `hops` its chunks."""

    hops: tuple[Hop, ...] = ()
    group: HopGroup | None = None


def terms(content: str) -> set[str]:
    """The words of a chunk that can link it to another: four letters or more, not common prose."""
    return {word.lower() for word in _TERM.findall(content)} - _COMMON


def related_groups(chunks: pl.DataFrame, max_hops: int = MAX_HOPS) -> list[HopGroup]:
    """The multi-hop groups of one document's chunks, each chunk in one group at most.

    Candidates are pairs of chunks that are not neighbours (neighbours share the chunker's overlap
    text, which would let one chunk answer alone) and are in the same section (equal non-empty
    heading path) or share at least MIN_SHARED_TERMS rare terms. The best-linked pairs are taken
    first; a pair grows to three chunks with the unused chunk linked to both, best linked first.
    Deterministic: the same chunks give the same groups, so a re-run asks the same requests.
    """
    rows = chunks.sort("position").select("document", "chunk_id", "position", "heading_path", "content").rows()
    if len(rows) < 3:
        return []
    document = rows[0][0]
    term_sets = [terms(content) for *_, content in rows]
    users: dict[str, list[int]] = defaultdict(list)
    for index, found in enumerate(term_sets):
        for term in found:
            users[term].append(index)
    rare = {term: indexes for term, indexes in users.items() if 2 <= len(indexes) <= RARE_TERM_MAX_CHUNKS}

    shared: dict[tuple[int, int], set[str]] = defaultdict(set)
    for term, indexes in rare.items():
        for a, b in combinations(indexes, 2):
            shared[(a, b)].add(term)
    by_section: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, (_, _, _, heading_path, _) in enumerate(rows):
        if heading_path:
            by_section[tuple(heading_path)].append(index)
    same_section = {
        (a, b)
        for indexes in by_section.values()
        for offset, a in enumerate(indexes)
        for b in indexes[offset + 1 : offset + 1 + SECTION_WINDOW]
    }

    def link(a: int, b: int) -> tuple[int, str, tuple[str, ...]] | None:
        """The strength of the link between two chunks, its kind and the rare terms they share."""
        a, b = min(a, b), max(a, b)
        if rows[b][2] - rows[a][2] < 2:
            return None
        words = tuple(sorted(shared.get((a, b), ())))
        heading = (a, b) in same_section
        if not heading and len(words) < MIN_SHARED_TERMS:
            return None
        kind = "heading+terms" if heading and words else "heading" if heading else "terms"
        return HEADING_WEIGHT * heading + len(words), kind, words

    candidates = sorted(
        ((found[0], a, b, found) for a, b in shared.keys() | same_section if (found := link(a, b))),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    neighbours: dict[int, set[int]] = defaultdict(set)
    for _, a, b, _ in candidates:
        neighbours[a].add(b)
        neighbours[b].add(a)
    used: set[int] = set()
    groups = []
    for _, a, b, (_, kind, words) in candidates:
        if a in used or b in used:
            continue
        members, kinds, all_words = [a, b], {kind}, set(words)
        if max_hops >= 3:
            thirds = []
            for c in (neighbours[a] & neighbours[b]) - used:
                links = (link(a, c), link(b, c))
                thirds.append((-min(found[0] for found in links), c, links))
            if thirds:
                _, c, links = min(thirds)
                members.append(c)
                kinds |= {found[1] for found in links}
                all_words |= {word for found in links for word in found[2]}
        used.update(members)
        linked_by = "heading+terms" if "heading+terms" in kinds or len(kinds) > 1 else kinds.pop()
        members.sort()
        groups.append((members, HopGroup(document, tuple(rows[i][1] for i in members), linked_by, tuple(sorted(all_words)))))
    return [group for _, group in sorted(groups, key=lambda item: item[0])]


class MultiHopSettings(GenerationSettings):
    """The settings of multi-hop requests: one question per group, evidence slots per hop."""

    table: ClassVar[Table] = Table.MULTIHOP_PAIRS
    prompt_versions: ClassVar[tuple[str, ...]] = (MULTIHOP_PROMPT_VERSION,)
    prompt_version: str = MULTIHOP_PROMPT_VERSION

    def schema(self) -> dict:
        """The largest group's schema: part of every request's cache key (the hop count is in the messages)."""
        return self._format(MAX_HOPS)

    def _format(self, hops: int) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "multihop_pair", "schema": multihop_schema(hops),
                                                       "strict": True}}

    def messages_for(self, task: ChunkTask) -> list[dict[str, str]]:
        return build_multihop_messages([(hop.heading_path, hop.content) for hop in _hops(task)])

    def schema_for(self, task: ChunkTask) -> dict:
        return self._format(len(_hops(task)))

    def parse(self, task: ChunkTask, content: str | None, finish_reason: str | None) -> list[MultiHopPair]:
        return [parse_multihop_pair(content, finish_reason, len(_hops(task)))]


def _hops(task: ChunkTask) -> tuple[Hop, ...]:
    if not isinstance(task, HopTask):
        raise TypeError(f"a multi-hop request needs a HopTask, got chunk {task.chunk_id!r}")
    return task.hops


def hop_tasks(chunks: pl.DataFrame, max_hops: int = MAX_HOPS) -> list[HopTask]:
    """One request per related group of one document's chunks."""
    by_id = {row["chunk_id"]: row for row in chunks.iter_rows(named=True)}
    tasks = []
    for group in related_groups(chunks, max_hops):
        hops = tuple(
            Hop(chunk_id, by_id[chunk_id]["content"], tuple(by_id[chunk_id]["heading_path"] or ()))
            for chunk_id in group.chunk_ids
        )
        tasks.append(HopTask(group.document, group.group_id, "", (), hops=hops, group=group))
    return tasks


def document_hop_tasks(storage: Storage, documents: Iterable[str], max_hops: int = MAX_HOPS) -> tuple[list[HopTask], list[str]]:
    """The multi-hop requests of the documents, and the documents that have no chunks yet."""
    tasks, missing = [], []
    for document in documents:
        chunks = storage.read_partition(Table.CHUNKS, document)
        if chunks is None:
            missing.append(document)
            continue
        tasks.extend(hop_tasks(chunks, max_hops))
    return tasks, missing


def multihop_frames(selected: list[ChunkResult], chunks: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The `multihop_pairs` rows (each hop's quotes located in that hop's chunk) and the failures."""
    groups = {group.group_id: group for group in related_groups(chunks)}
    texts = {chunk_id: ChunkText(content) for chunk_id, content in chunks.select("chunk_id", "content").iter_rows()}
    rows = []
    for result in selected:
        if not result.ok:
            continue
        group = groups[result.chunk_id]
        for index, pair in enumerate(result.pairs):
            hop_evidence = getattr(pair, "hop_evidence", None) or [pair.evidence]
            quote_chunks, matches = [], []
            for chunk_id, quotes in zip(group.chunk_ids, hop_evidence, strict=False):
                located = locate_evidence(quotes, texts[chunk_id])
                quote_chunks += [chunk_id] * len(quotes)
                matches += located.matches
            # Every hop must be quoted: a hop without a quote leaves the question answerable without it.
            every_hop = len(hop_evidence) == len(group.chunk_ids) and all(hop_evidence)
            score = min((m.score for m in matches), default=0.0) if every_hop else 0.0
            rows.append(
                {
                    "document": result.document,
                    "group_id": result.chunk_id,
                    "hop_chunk_ids": list(group.chunk_ids),
                    "linked_by": group.linked_by,
                    "shared_terms": list(group.shared_terms),
                    "pair_index": index,
                    "question": pair.question,
                    "answer": pair.answer,
                    "type": pair.type,
                    "difficulty": pair.difficulty,
                    "evidence": [m.quote for m in matches],
                    "evidence_chunk_ids": quote_chunks,
                    "evidence_starts": [m.start for m in matches],
                    "evidence_ends": [m.end for m in matches],
                    "evidence_methods": [m.method for m in matches],
                    "evidence_not_found": sum(not m.found for m in matches),
                    "evidence_score": score,
                    "model": result.model,
                    "latency_s": result.latency_s,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "attempts": result.attempts,
                    "endpoint": result.endpoint,
                    "request_hash": result.request_hash,
                    "prompt_version": result.prompt_version,
                    "max_tokens": result.max_tokens_used,
                    "temperature": result.temperature,
                    "generated_at": result.finished_at,
                }
            )
    _, failures = results_to_frames(result for result in selected if not result.ok)
    return pl.DataFrame(rows, schema=MULTIHOP_PAIRS_SCHEMA), failures


MULTIHOP_TABLES = ResultTables(
    Table.MULTIHOP_PAIRS,
    Table.MULTIHOP_FAILURES,
    current_ids=lambda chunks: [group.group_id for group in related_groups(chunks)],
    frames=multihop_frames,
)


def multihop_verdicts(
    document: str, groups: int, pairs: pl.DataFrame, failures: pl.DataFrame, thresholds: QualityThresholds
) -> list[Verdict]:
    """The success-rate and evidence checks of one document's multi-hop pairs, as for `qa_pairs`: a
    group counts as a chunk, and a pair's evidence is supported when every hop's quotes are in their chunk."""
    answered = set(pairs["group_id"].to_list())
    failed = failures.filter(~pl.col("chunk_id").is_in(list(answered)))
    score = pl.col("evidence_score").fill_null(0.0)
    mean = pairs["evidence_score"].mean()
    quality = PartitionQuality(
        document=document,
        chunks=groups,
        chunks_with_pairs=len(answered),
        chunks_failed=failed["chunk_id"].n_unique(),
        chunks_truncated=failed.filter(pl.col("reason") == "truncated")["chunk_id"].n_unique(),
        pairs=pairs.height,
        mean_groundedness=None,
        ungrounded=0,
        with_unsupported_numbers=0,
        refusals=0,
        unsupported=0,
        duplicates=0,
        mean_evidence_score=float(mean) if mean is not None else None,
        evidence_unsupported=pairs.filter(score < thresholds.min_evidence_score).height,
        without_evidence=pairs.filter(pl.col("evidence").list.len().fill_null(0) == 0).height,
    )
    return [success_rate_verdict(quality, thresholds), evidence_verdict(quality, thresholds)]
