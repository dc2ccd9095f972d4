"""LLM-as-judge: rates a seeded sample of QA pairs against their chunks with the A/B/C rubric, and
measures how well the verdicts agree with the heuristic scores."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

import polars as pl
from pydantic import BaseModel, Field, ValidationError

from qa_pipeline.core.client import LLMClient
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.dispatch import Dispatcher
from qa_pipeline.core.prompts import PASSAGE_CLOSE, PASSAGE_OPEN, FailureReason, ParseError, response_format
from qa_pipeline.core.quality import QualityThresholds
from qa_pipeline.core.storage import JUDGEMENTS_SCHEMA, Storage

JUDGE_PROMPT_VERSION = "judge-v1"


class Judgement(BaseModel):
    """What the judge must return for one QA pair."""

    rating: Literal["A", "B", "C"] = Field(
        description="A: correct, natural, helpful, derivable from the passage; B: minor issues or speculation; "
        "C: wrong, hallucinated or not derivable"
    )
    hallucination: bool = Field(description="the answer states something the passage does not support")
    reasoning: str = Field(max_length=2000, description="one or two sentences")


JUDGE_SYSTEM_PROMPT = (
    "You review question/answer pairs written about a passage of documentation. Rate each pair:\n"
    "A: the answer is correct, the question natural and helpful, and both are derivable from the passage alone.\n"
    "B: minor issues: the answer is imprecise or incomplete, the question awkward, or there is some "
    "speculation beyond the passage.\n"
    "C: the answer is wrong, hallucinated, or cannot be derived from the passage.\n"
    "Set hallucination to true if the answer states any fact the passage does not support. "
    'Reply with JSON only: {"rating": "A" | "B" | "C", "hallucination": true | false, "reasoning": "..."}.'
)


def build_judge_messages(passage: str, question: str, answer: str) -> list[dict[str, str]]:
    user = f"{PASSAGE_OPEN}\n{passage}\n{PASSAGE_CLOSE}\n\nQuestion: {question}\nAnswer: {answer}"
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_judgement(content: str | None, finish_reason: str | None = "stop") -> Judgement:
    """The judge's verdict, or a ParseError saying why its answer is not one."""
    if finish_reason == "length":
        raise ParseError(FailureReason.TRUNCATED, "the verdict was cut by max_tokens (finish_reason=length)")
    if content is None or not content.strip():
        raise ParseError(FailureReason.EMPTY_RESPONSE, "the judge returned no content")
    text = content.strip()
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:  # prose or a code fence around the object
        text = text[start : end + 1]
    try:
        return Judgement.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        raise ParseError(FailureReason.INVALID_JSON, f"{error.msg} at position {error.pos}") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "root"
        reason = FailureReason.MISSING_FIELD if first["type"] == "missing" else FailureReason.INVALID_VALUE
        raise ParseError(reason, f"{where}: {first['msg']}") from None


SAMPLE_SQL = """
SELECT q.document, q.chunk_id, q.pair_index, q.question, q.answer, c.content,
       s.groundedness, coalesce(len(s.unsupported_numbers), 0) AS unsupported_numbers, s.refusal
FROM qa_pairs q
JOIN chunks c USING (document, chunk_id)
LEFT JOIN pair_scores s USING (document, chunk_id, pair_index)
ORDER BY md5(concat($seed, '|', q.document, '|', q.chunk_id, '|', q.pair_index))
LIMIT $size
"""


def sample_pairs(storage: Storage, size: int, seed: int) -> pl.DataFrame:
    """A seeded sample of QA pairs with their chunk and heuristic scores; a pair's place in the order
    depends only on the seed and the pair, so adding documents keeps earlier picks comparable."""
    with storage.connect() as connection:
        return connection.sql(SAMPLE_SQL, params={"seed": str(seed), "size": size}).pl()


async def judge_pairs(
    client: LLMClient,
    sample: pl.DataFrame,
    run_id: str,
    concurrency: int = 8,
    max_tokens: int = 512,
    thresholds: QualityThresholds | None = None,
    log: Callable[[str], None] = print,
) -> pl.DataFrame:
    """`judgements` rows: one verdict per sampled pair, or the reason there is none."""
    thresholds = thresholds or QualityThresholds()
    schema = response_format(Judgement, name="judgement")
    model = client.model or await client.resolve_model()

    async def judge(row: dict) -> dict:
        outcome = await client.chat(
            build_judge_messages(row["content"], row["question"], row["answer"]),
            response_format=schema,
            max_tokens=max_tokens,
            temperature=0.0,
            seed=0,
        )
        verdict, reason, detail = None, outcome.failure_reason, outcome.error
        if outcome.ok:
            try:
                verdict = parse_judgement(outcome.content, outcome.finish_reason)
            except ParseError as error:
                reason, detail = error.reason, error.detail
        if verdict is None:
            where = f"pair {row['pair_index']} of chunk {row['chunk_id']} ({row['document']})"
            log(f"no verdict for {where}: {reason}: {detail}")
        grounded = row["groundedness"]
        return {
            "run_id": run_id,
            "judged_at": datetime.now(UTC),
            "judge_model": model,
            "judge_endpoint": outcome.endpoint,
            "document": row["document"],
            "chunk_id": row["chunk_id"],
            "pair_index": row["pair_index"],
            "rating": verdict.rating if verdict else None,
            "hallucination": verdict.hallucination if verdict else None,
            "reasoning": verdict.reasoning if verdict else None,
            "failure_reason": None if verdict else str(reason),
            "failure_detail": None if verdict else detail,
            "latency_s": outcome.latency_s,
            "groundedness": grounded,
            "heuristic_flagged": bool(
                (grounded is not None and grounded < thresholds.ungrounded_below)
                or row["unsupported_numbers"]
                or row["refusal"]
            ),
        }

    rows = list(sample.iter_rows(named=True))
    verdicts: dict[int, dict] = {}
    await Dispatcher(FixedLimit(max(1, concurrency))).run(
        range(len(rows)), lambda index: judge(rows[index]), on_done=verdicts.__setitem__
    )
    return pl.DataFrame([verdicts[index] for index in range(len(rows))], schema=JUDGEMENTS_SCHEMA)


def agreement(judgements: pl.DataFrame) -> tuple[dict[str, float | int | None], pl.DataFrame]:
    """How the judge's verdicts relate to the heuristic scores: a summary, and a table per rating
    (pairs, hallucinations, pairs the heuristics flagged, their mean groundedness).

    The judge "flags" a pair it rates C or calls hallucinated; agreement is the share of judged
    pairs on which judge and heuristics flag alike.
    """
    judged = judgements.filter(pl.col("rating").is_not_null())
    judge_flags = (pl.col("rating") == "C") | pl.col("hallucination")
    flagged_both = judged.filter(judge_flags & pl.col("heuristic_flagged")).height
    flagged_by_judge = judged.filter(judge_flags).height
    summary: dict[str, float | int | None] = {
        "sampled": judgements.height,
        "judged": judged.height,
        "failed": judgements.height - judged.height,
        "share_a": _share(judged, pl.col("rating") == "A"),
        "share_b": _share(judged, pl.col("rating") == "B"),
        "share_c": _share(judged, pl.col("rating") == "C"),
        "hallucination_rate": _share(judged, pl.col("hallucination")),
        "heuristic_flag_rate": _share(judged, pl.col("heuristic_flagged")),
        "agreement": _share(judged, judge_flags == pl.col("heuristic_flagged")),
        # Of the pairs the judge flags, the share the heuristics catch too.
        "heuristic_recall": flagged_both / flagged_by_judge if flagged_by_judge else None,
    }
    by_rating = (
        judged.group_by("rating")
        .agg(
            pairs=pl.len(),
            hallucinations=pl.col("hallucination").sum(),
            heuristic_flagged=pl.col("heuristic_flagged").sum(),
            mean_groundedness=pl.col("groundedness").mean(),
        )
        .sort("rating")
    )
    return summary, by_rating


def _share(frame: pl.DataFrame, condition: pl.Expr) -> float | None:
    return frame.select(condition.cast(pl.Float64()).mean()).item() if frame.height else None
