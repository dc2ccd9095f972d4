"""The QA generation prompt, its JSON schema (one slot per question type), and the parser that validates
(and repairs) answers."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from qa_pipeline.core.settings import DEFAULT_QUESTION_TYPE_DESCRIPTIONS

# qa-v2: one schema slot per question type, a difficulty label and verbatim evidence quotes per pair.
PROMPT_VERSION = "qa-v2"
# The same request with a terse instruction (fewer prompt tokens, no step-by-step guidance); both ask
# for the same schema, so a model's prompt version can be compared like any other figure.
BRIEF_PROMPT_VERSION = "qa-v2-brief"
# The versions a request can be built with (a named model's `prompt_version` in the models file).
PROMPT_VERSIONS: tuple[str, ...] = (PROMPT_VERSION, BRIEF_PROMPT_VERSION)
PASSAGE_OPEN = "<passage>"
PASSAGE_CLOSE = "</passage>"

DEFAULT_QUESTION_TYPES: tuple[str, ...] = tuple(DEFAULT_QUESTION_TYPE_DESCRIPTIONS)
Difficulty = Literal["easy", "medium", "hard"]
DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")
# Bounds of each slot's strings in the schema. Structured output stops a string at its bound, so they
# cap an answer's length: with three slots the embedded 135M model, which rambles until a bound, ran
# past max_tokens on 2 of 6 chunks with quotes of 1000 characters, three of them, and answers of 4000.
MAX_EVIDENCE_QUOTES = 2
MAX_QUOTE_CHARS = 500
MAX_QUESTION_CHARS = 300
MAX_ANSWER_CHARS = 1000


class FailureReason(StrEnum):
    """Why a chunk produced no QA pairs; stored in the `failures` table."""

    HTTP_ERROR = "http_error"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    INVALID_JSON = "invalid_json"
    MISSING_FIELD = "missing_field"
    INVALID_VALUE = "invalid_value"
    TRUNCATED = "truncated"
    EMPTY_RESPONSE = "empty_response"
    MODEL_NOT_FOUND = "model_not_found"
    STALLED = "stalled"


class QAPair(BaseModel):
    """One question with its answer, answerable from the chunk alone, and the passage's words that support it.

    `difficulty` and `evidence` are asked for by the schema; a server that ignores the schema may leave
    them out, and the pair is kept (its evidence then counts as not found, see core.evidence).
    """

    question: str = Field(min_length=3, max_length=1000)
    answer: str = Field(min_length=1, max_length=4000)
    type: str = Field(min_length=1)
    difficulty: Difficulty | None = None
    evidence: list[str] = Field(default_factory=list, max_length=10)

    @field_validator("difficulty", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class MultiHopPair(QAPair):
    """A question that needs several chunks: `hop_evidence[i]` holds the quotes from hop i's chunk, and
    `evidence` all of them, in hop order (so readers of `evidence` alone still see every quote)."""

    hop_evidence: list[list[str]] = Field(min_length=2)


class QAPairSet(BaseModel):
    """What a server that ignores the schema may return for one chunk: a list of typed pairs."""

    pairs: list[QAPair] = Field(min_length=1, max_length=10)


class ParseError(Exception):
    """The server's answer could not be turned into valid QA pairs."""

    def __init__(self, reason: FailureReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


SYSTEM_PROMPT = (
    "You write question/answer pairs for evaluating retrieval systems. Every question must be "
    "answerable from the passage alone, and every answer must use only facts stated in the passage. "
    "Reply with JSON only."
)


def question_types_described(
    question_types: Sequence[str] = DEFAULT_QUESTION_TYPES, descriptions: Mapping[str, str] | None = None
) -> dict[str, str]:
    """type → its one-line description, in the requested order: `descriptions` first, then the defaults,
    else a generic line (a type the user names without describing it still gets a slot)."""
    chosen = {**DEFAULT_QUESTION_TYPE_DESCRIPTIONS, **(descriptions or {})}
    described = {}
    for kind in question_types:
        kind = kind.strip()
        if not kind:
            raise ValueError("a question type is empty: name each type, e.g. factual,conceptual,comparison")
        if kind in described:
            raise ValueError(f"question type {kind!r} is listed twice: each type gets one slot")
        described[kind] = " ".join(chosen.get(kind, f"a {kind} question about the passage").split())
    if not described:
        raise ValueError("no question type: name at least one, e.g. factual")
    return described


def qa_schema(question_types: Mapping[str, str]) -> dict:
    """The JSON schema of one chunk's answer: an object with one slot per question type, in order, so
    structured output yields exactly the requested mix. Each slot is one pair with its evidence quotes
    (before the answer, so the answer is written from them) and a difficulty label."""

    def slot(kind: str, description: str) -> dict:
        return {
            "type": "object",
            "description": f"one {kind} question: {description}",
            "properties": {
                # A one-value enum: the slot says its type, which also lets readers of the raw output see it.
                "type": {"type": "string", "enum": [kind]},
                "question": {"type": "string", "minLength": 3, "maxLength": MAX_QUESTION_CHARS},
                "evidence": {
                    "type": "array",
                    "description": "sentences copied word for word from the passage that support the answer",
                    "items": {"type": "string", "minLength": 1, "maxLength": MAX_QUOTE_CHARS},
                    "minItems": 1,
                    "maxItems": MAX_EVIDENCE_QUOTES,
                },
                "answer": {"type": "string", "minLength": 1, "maxLength": MAX_ANSWER_CHARS},
                "difficulty": {"type": "string", "enum": list(DIFFICULTIES)},
            },
            "required": ["type", "question", "evidence", "answer", "difficulty"],
            "additionalProperties": False,
        }

    return {
        "type": "object",
        "properties": {kind: slot(kind, description) for kind, description in question_types.items()},
        "required": list(question_types),
        "additionalProperties": False,
    }


def response_format(
    schema_model: type[BaseModel] | None = None,
    name: str = "qa_pairs",
    question_types: Mapping[str, str] | None = None,
) -> dict:
    """`response_format` for OpenAI-compatible servers (vLLM structured output): a pydantic model's
    schema, or (no model) the QA schema for `question_types` (default: the three default types)."""
    if schema_model is not None:
        schema = schema_model.model_json_schema()
    else:
        schema = qa_schema(question_types or question_types_described())
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def check_prompt_version(version: str, known: Sequence[str] = PROMPT_VERSIONS) -> str:
    """`version` if it is one of `known`, else a ValueError listing them."""
    if version not in known:
        raise ValueError(f"unknown prompt version {version!r}; the known versions are: {', '.join(known)}")
    return version


def build_messages(
    content: str,
    heading_path: list[str] | None = None,
    question_types: Sequence[str] | Mapping[str, str] = DEFAULT_QUESTION_TYPES,
    prompt_version: str = PROMPT_VERSION,
) -> list[dict[str, str]]:
    """Chat messages asking for one QA pair per question type about one passage, each with evidence
    quoted from the passage and a difficulty label, worded as `prompt_version` says."""
    check_prompt_version(prompt_version)
    described = question_types if isinstance(question_types, Mapping) else question_types_described(question_types)
    wanted = "\n".join(f"- {kind}: {description}" for kind, description in described.items())
    # The shape with bare ellipses: a placeholder text in it ("<sentence from the passage>") is what a
    # small model copies into its answer instead of a sentence of the passage.
    first = next(iter(described))
    shape = f'"{first}": {{"type": "{first}", "question": ..., "evidence": [...], "answer": ..., "difficulty": ...}}'
    shape += ", ..." if len(described) > 1 else ""
    section = f"Section: {' > '.join(heading_path)}\n" if heading_path else ""
    if prompt_version == BRIEF_PROMPT_VERSION:
        instruction = (
            f"Write one question/answer pair of each type about the passage below:\n{wanted}\n"
            "Quote the passage's supporting sentences as evidence.\n"
        )
    else:
        instruction = (
            f"Write {len(described)} question/answer pairs about the passage below, one of each type:\n{wanted}\n"
            "For each question, first copy into evidence the sentence or sentences of the passage that answer it, "
            "exactly as they are written there; then write the answer from them, and rate how hard the question "
            "is (easy, medium or hard).\n"
        )
    user = f"{instruction}Return {{{shape}}}.\n\n{section}{PASSAGE_OPEN}\n{content}\n{PASSAGE_CLOSE}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def extract_passage(text: str) -> str:
    """The passage inside a prompt built by `build_messages` (the whole text if unmarked)."""
    start = text.find(PASSAGE_OPEN)
    end = text.rfind(PASSAGE_CLOSE)
    if start == -1 or end == -1 or end < start:
        return text
    return text[start + len(PASSAGE_OPEN) : end].strip()


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _json_candidate(content: str) -> str:
    """The JSON text inside an answer: strips code fences and prose around the outer object."""
    stripped = content.strip()
    if stripped[:1] in ("{", "["):
        return stripped
    fenced = _FENCE.search(content)
    if fenced:
        return fenced.group(1).strip()
    start = content.find("{")
    end = content.rfind("}")
    if start != -1 and end > start:
        return content[start : end + 1]
    return content.strip()


def _answer_json(content: str | None, finish_reason: str | None) -> Any:
    """The JSON value of a complete answer, or a ParseError: cut by max_tokens, empty, or not JSON."""
    if finish_reason == "length":
        raise ParseError(FailureReason.TRUNCATED, "output was cut by max_tokens (finish_reason=length)")
    if content is None or not content.strip():
        raise ParseError(FailureReason.EMPTY_RESPONSE, "the server returned no content")
    try:
        return json.loads(_json_candidate(content))
    except json.JSONDecodeError as error:
        raise ParseError(FailureReason.INVALID_JSON, f"{error.msg} at position {error.pos}") from None


def parse_pairs(
    content: str | None, finish_reason: str | None = "stop", question_types: Sequence[str] = DEFAULT_QUESTION_TYPES
) -> list[QAPair]:
    """Validated QA pairs from a chat completion's content, or a ParseError saying why not.

    The schema's shape (one slot per type) gives the pairs in the requested order. A server that
    ignores the schema may answer with a list of typed pairs instead (`{"pairs": [...]}` or a bare
    list): each must have one of the requested types.
    """
    data = _answer_json(content, finish_reason)
    if isinstance(data, list):
        data = {"pairs": data}
    wanted = list(question_types)
    try:
        if isinstance(data, dict) and "pairs" not in data and any(kind in data for kind in wanted):
            return _slot_pairs(data, wanted)
        if isinstance(data, dict) and "pairs" not in data:
            slots = [key for key, value in data.items() if isinstance(value, dict) and "question" in value]
            if slots:
                raise ParseError(
                    FailureReason.MISSING_FIELD,
                    f"the answer fills the question types {slots}, not the requested {wanted}: were its requests "
                    "made with other --question-types? Ask (or import-batch) with the same ones",
                )
        pairs = QAPairSet.model_validate(data).pairs
    except ValidationError as error:
        raise _validation_failure(error) from None
    for index, pair in enumerate(pairs):
        if pair.type not in wanted:
            raise ParseError(
                FailureReason.INVALID_VALUE, f"pairs.{index}.type: {pair.type!r} is not one of the requested {wanted}"
            )
    return pairs


def _slot_pairs(data: dict, wanted: list[str]) -> list[QAPair]:
    """The pairs of a schema-shaped answer, in the requested order; every slot must be filled."""
    for kind in wanted:
        if kind not in data:
            raise ParseError(FailureReason.MISSING_FIELD, f"{kind}: the {kind} question is missing")
        if not isinstance(data[kind], dict):
            raise ParseError(FailureReason.INVALID_VALUE, f"{kind}: expected an object with question and answer")
    pairs = []
    for kind in wanted:
        # The slot's key is its type: a `type` field saying otherwise is the model's slip, not a second type.
        try:
            pairs.append(QAPair.model_validate({**data[kind], "type": kind}))
        except ValidationError as error:
            raise _validation_failure(error, prefix=kind) from None
    return pairs


def _validation_failure(error: ValidationError, prefix: str = "") -> ParseError:
    first = error.errors()[0]
    where = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "") or "root"
    reason = FailureReason.MISSING_FIELD if first["type"] == "missing" else FailureReason.INVALID_VALUE
    return ParseError(reason, f"{where}: {first['msg']}")


# multihop-v1: one question needing every passage of a group, with evidence quoted from each passage.
MULTIHOP_PROMPT_VERSION = "multihop-v1"
MULTIHOP_TYPE = "multi_hop"
MULTIHOP_SYSTEM_PROMPT = (
    "You write question/answer pairs for evaluating retrieval systems. Every question must need all the "
    "passages it is given to be answered, and every answer must use only facts stated in them. "
    "Reply with JSON only."
)


def evidence_field(hop: int) -> str:
    """The schema field holding the quotes of passage `hop` (counted from 1)."""
    return f"evidence_{hop}"


def multihop_schema(hops: int) -> dict:
    """The JSON schema of a multi-hop answer: the question, one evidence slot per passage (so structured
    output makes the model quote every passage), the answer and a difficulty label."""
    quotes = {
        evidence_field(hop): {
            "type": "array",
            "description": f"sentences copied word for word from passage {hop} that the answer needs",
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_QUOTE_CHARS},
            "minItems": 1,
            "maxItems": MAX_EVIDENCE_QUOTES,
        }
        for hop in range(1, hops + 1)
    }
    return {
        "type": "object",
        "properties": {
            "question": {"type": "string", "minLength": 3, "maxLength": MAX_QUESTION_CHARS},
            **quotes,
            "answer": {"type": "string", "minLength": 1, "maxLength": MAX_ANSWER_CHARS},
            "difficulty": {"type": "string", "enum": list(DIFFICULTIES)},
        },
        "required": ["question", *quotes, "answer", "difficulty"],
        "additionalProperties": False,
    }


def build_multihop_messages(passages: Sequence[tuple[Sequence[str], str]]) -> list[dict[str, str]]:
    """Chat messages asking for one question that needs every passage (heading path, text), with
    evidence quoted from each."""
    blocks = []
    for hop, (heading_path, content) in enumerate(passages, start=1):
        section = f" (section: {' > '.join(heading_path)})" if heading_path else ""
        blocks.append(f"Passage {hop}{section}:\n{PASSAGE_OPEN}\n{content}\n{PASSAGE_CLOSE}")
    slots = ", ".join(f'"{evidence_field(hop)}": [...]' for hop in range(1, len(passages) + 1))
    user = (
        f"Write one question whose answer needs facts from all {len(passages)} passages below: a reader who "
        "sees only one of them cannot answer it. For each passage, first copy into its evidence the sentence "
        "or sentences of that passage the answer needs, exactly as they are written there; then write the "
        "answer from them, and rate how hard the question is (easy, medium or hard).\n"
        f'Return {{"question": ..., {slots}, "answer": ..., "difficulty": ...}}.\n\n'
        + "\n\n".join(blocks)
    )
    return [{"role": "system", "content": MULTIHOP_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def extract_passages(text: str) -> list[str]:
    """Every passage inside a prompt, in order (one for `build_messages`, one per hop for
    `build_multihop_messages`)."""
    passages, start = [], text.find(PASSAGE_OPEN)
    while start != -1:
        end = text.find(PASSAGE_CLOSE, start)
        if end == -1:
            break
        passages.append(text[start + len(PASSAGE_OPEN) : end].strip())
        start = text.find(PASSAGE_OPEN, end)
    return passages


def parse_multihop_pair(content: str | None, finish_reason: str | None, hops: int) -> MultiHopPair:
    """The multi-hop pair of a chat completion's content, or a ParseError saying why not. Every passage
    must have at least one quote: a question that quotes one passage only is not multi-hop."""
    data = _answer_json(content, finish_reason)
    if not isinstance(data, dict):
        raise ParseError(FailureReason.INVALID_VALUE, "expected an object with question, evidence and answer")
    hop_evidence = []
    for hop in range(1, hops + 1):
        quotes = data.get(evidence_field(hop))
        if not quotes:
            raise ParseError(FailureReason.MISSING_FIELD, f"{evidence_field(hop)}: no quote from passage {hop}")
        if not isinstance(quotes, list) or not all(isinstance(quote, str) for quote in quotes):
            raise ParseError(FailureReason.INVALID_VALUE, f"{evidence_field(hop)}: expected a list of quotes")
        hop_evidence.append(quotes)
    fields = {key: data.get(key) for key in ("question", "answer", "difficulty") if key in data}
    try:
        return MultiHopPair.model_validate(
            {**fields, "type": MULTIHOP_TYPE, "evidence": [q for quotes in hop_evidence for q in quotes],
             "hop_evidence": hop_evidence}
        )
    except ValidationError as error:
        raise _validation_failure(error) from None
