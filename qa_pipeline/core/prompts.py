"""The QA generation prompt, its JSON schema, and the parser that validates (and repairs) answers."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

PROMPT_VERSION = "qa-v1"
PASSAGE_OPEN = "<passage>"
PASSAGE_CLOSE = "</passage>"

QuestionType = Literal["factual", "conceptual", "comparison"]
DEFAULT_QUESTION_TYPES: tuple[str, ...] = ("factual", "conceptual", "comparison")


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
    """One question with its answer, answerable from the chunk alone."""

    question: str = Field(min_length=3, max_length=1000)
    answer: str = Field(min_length=1, max_length=4000)
    type: QuestionType


class QAPairSet(BaseModel):
    """What the model must return for one chunk."""

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


def response_format(schema_model: type[BaseModel] = QAPairSet, name: str = "qa_pairs") -> dict:
    """`response_format` for OpenAI-compatible servers (vLLM structured output)."""
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema_model.model_json_schema(), "strict": True},
    }


def build_messages(
    content: str,
    heading_path: list[str] | None = None,
    question_types: tuple[str, ...] = DEFAULT_QUESTION_TYPES,
) -> list[dict[str, str]]:
    """Chat messages asking for one QA pair per question type about one passage."""
    wanted = "\n".join(f"- one {kind} question" for kind in question_types)
    section = f"Section: {' > '.join(heading_path)}\n" if heading_path else ""
    user = (
        f"Write {len(question_types)} question/answer pairs about the passage below:\n{wanted}\n"
        "A factual question asks for a specific fact; a conceptual question asks why or how; "
        "a comparison question contrasts two things the passage mentions.\n"
        'Return {"pairs": [{"question": ..., "answer": ..., "type": ...}]}.\n\n'
        f"{section}{PASSAGE_OPEN}\n{content}\n{PASSAGE_CLOSE}"
    )
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


def parse_pairs(content: str | None, finish_reason: str | None = "stop") -> list[QAPair]:
    """Validated QA pairs from a chat completion's content, or a ParseError saying why not."""
    if finish_reason == "length":
        raise ParseError(FailureReason.TRUNCATED, "output was cut by max_tokens (finish_reason=length)")
    if content is None or not content.strip():
        raise ParseError(FailureReason.EMPTY_RESPONSE, "the server returned no content")
    try:
        data = json.loads(_json_candidate(content))
    except json.JSONDecodeError as error:
        raise ParseError(FailureReason.INVALID_JSON, f"{error.msg} at position {error.pos}") from None
    if isinstance(data, list):
        data = {"pairs": data}
    try:
        return QAPairSet.model_validate(data).pairs
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "root"
        reason = FailureReason.MISSING_FIELD if first["type"] == "missing" else FailureReason.INVALID_VALUE
        raise ParseError(reason, f"{where}: {first['msg']}") from None
