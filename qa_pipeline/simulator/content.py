"""What the simulator answers: a JSON instance of the requested schema, with strings taken from the passage."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from qa_pipeline.core.prompts import qa_schema, question_types_described


class SchemaError(ValueError):
    """The response_format schema uses something the simulator cannot generate."""


@dataclass(frozen=True)
class EvidenceRates:
    """How the simulator's evidence quotes are drawn: the shares reworded and made up, and the seed."""

    paraphrase: float = 0.0
    invented: float = 0.0
    seed: int = 0


QuoteKind = str  # "verbatim", "paraphrased" or "invented"


def evidence_kind(passage: str, pair: int, quote: int, rates: EvidenceRates) -> QuoteKind:
    """What the simulator does with quote `quote` of pair `pair` of an answer about `passage`: a draw
    fixed by them and the seed, so a benchmark knows each quote's true kind without asking."""
    digest = hashlib.blake2b(f"{rates.seed}\0{pair}\0{quote}\0{passage}".encode(), digest_size=8).digest()
    draw = int.from_bytes(digest, "big") / 2**64
    if draw < rates.invented:
        return "invented"
    if draw < rates.invented + rates.paraphrase:
        return "paraphrased"
    return "verbatim"


# Made-up support a model might give: the passage's topic with specifics the passage does not state.
_INVENTED_QUOTES = (
    "{topic} was deprecated in release {n}.{m} after a security review by the steering council.",
    "According to the maintainers, {topic} doubles throughput on machines with more than {n}{m} cores.",
    "Since {year}, {topic} has been required by every vendor certified under the compliance programme.",
    "The original design of {topic} was abandoned because it corrupted data on {n} of {m}0 test systems.",
)


def _paraphrased(sentence: str, draw: int) -> str:
    """The sentence as a careless model quotes it: another case, spacing and apostrophes, no final stop,
    and in a longer sentence one short word (an article, a preposition) left out."""
    words = sentence.split()
    short = [i for i, word in enumerate(words[1:-1], start=1) if len(word) <= 3]
    if len(words) >= 8 and short:
        del words[short[draw % len(short)]]
    text = (" ".join(words).replace("'", "’")).rstrip(".")
    # A "sentence" of punctuation (an RST directive's "..") has nothing to reword: quoted as it is.
    return text[:1].lower() + text[1:] if any(char.isalnum() for char in text) else sentence


def _invented(topic: str, draw: int) -> str:
    template = _INVENTED_QUOTES[draw % len(_INVENTED_QUOTES)]
    return template.format(topic=topic, n=3 + draw % 7, m=1 + draw % 5, year=1990 + draw % 30)


@dataclass(frozen=True)
class _Material:
    """Sentences of one passage; a short topic phrase is taken from one when a value needs it."""

    sentences: tuple[str, ...]
    passage: str = ""
    evidence: EvidenceRates = EvidenceRates()
    # A multi-hop prompt's passages, each its own material: the quotes of slot `evidence_N` come from hop N.
    hops: tuple[_Material, ...] = ()

    def hop(self, name: str) -> _Material:
        """The material an evidence field quotes: its hop's passage (`evidence_2`: the second), else this one."""
        numbered = _HOP_FIELD.search(name)
        if numbered and self.hops and 1 <= int(numbered.group(1)) <= len(self.hops):
            return self.hops[int(numbered.group(1)) - 1]
        return self

    def sentence(self, index: int) -> str:
        return self.sentences[index % len(self.sentences)]

    def topic(self, index: int) -> str:
        return _topic(self.sentence(index))


_HOP_FIELD = re.compile(r"_(\d+)$")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’_-]*")
_LEADING_STOPWORDS = frozenset(
    "a an and as at but by for from how if in is it its of on or so that the then these this those to "
    "we what when where which while who why with you your".split()
)
_PHRASE_BREAKS = frozenset(
    "is are was were be been has have had can could will would should may might must does do did "
    "of in on at to for with by from into about than that which who and or but".split()
)


def _material(
    passage: str, evidence: EvidenceRates = EvidenceRates(), hops: tuple[str, ...] = ()
) -> _Material:
    units = [unit.strip() for unit in _SENTENCE_BREAK.split(passage)]
    sentences = [unit for unit in units if _counts_words(unit, 3)] or [unit for unit in units if unit]
    if not sentences:
        sentences = ["The passage is empty."]
    return _Material(tuple(sentences), passage, evidence, tuple(_material(hop, evidence) for hop in hops))


def _counts_words(text: str, count: int) -> bool:
    return sum(1 for _ in itertools.islice(_WORD.finditer(text), count)) == count


def _topic(sentence: str) -> str:
    """The sentence's leading phrase, cut before its first verb or preposition when it has a common one."""
    words: list[str] = []
    skipped = None  # a sentence of stopwords only keeps its last one
    for match in _WORD.finditer(sentence):
        word = match.group()
        if words or word.lower() not in _LEADING_STOPWORDS:
            words.append(word)
            if len(words) == 5:
                break
        else:
            skipped = word
    if not words and skipped:
        words = [skipped]
    end = next((i for i, word in enumerate(words) if i > 0 and word.lower() in _PHRASE_BREAKS), 5)
    return " ".join(words[:end]) or "the passage"


_QUESTION_TEMPLATES = {
    "factual": "What does the passage say about {topic}?",
    "conceptual": "How does the passage explain {topic}?",
    "comparison": "How does {topic} compare with {other} according to the passage?",
}
_QUESTION_FIELD = re.compile(r"question|query|prompt", re.IGNORECASE)
_EVIDENCE_FIELD = re.compile(r"evidence|quote|citation", re.IGNORECASE)
_FORMAT_EXAMPLES = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "someone@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
# Arrays without an enum to enumerate get this many items (within minItems/maxItems).
_DEFAULT_ARRAY_ITEMS = 3
# Recursive schemas stop growing here: deeper objects keep only required fields, arrays minItems.
_MAX_DEPTH = 6


@dataclass
class _Draw:
    """Where in the instance a value is generated: which array item, under which enum value, how deep."""

    material: _Material
    item: int = 0
    kind: str | None = None
    depth: int = 0
    strings: int = 0
    parent_item: int = 0  # the item of the object holding this array (for an evidence quote: its pair)


_Generate = Callable[[_Draw], Any]


class _SchemaCompiler:
    """Turns a JSON schema into a function that generates an instance of it."""

    def __init__(self, root: Any):
        self.root = root
        self.refs: dict[tuple[str, str], _Generate] = {}

    def compile(self, node: Any, name: str = "") -> _Generate:
        if not isinstance(node, dict):
            return self._string({}, name)  # `true` accepts anything
        if "$ref" in node:
            return self._ref(node["$ref"], name)
        if "allOf" in node:
            merged = {key: value for key, value in node.items() if key != "allOf"}
            for part in node["allOf"]:
                merged = {**self.resolve(part), **merged}
            return self.compile(merged, name)
        if "const" in node:
            constant = node["const"]
            return lambda draw: constant
        if "enum" in node:
            return self._enum(list(node["enum"]))
        for key in ("anyOf", "oneOf"):
            if key in node:
                options = [option for option in node[key] if self.resolve(option).get("type") != "null"]
                return self.compile((options or node[key])[0], name)
        kind = node.get("type")
        if isinstance(kind, list):
            kind = next((each for each in kind if each != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in node else "array" if "items" in node else "string"
        builders = {
            "object": self._object,
            "array": self._array,
            "string": self._string,
            "integer": self._integer,
            "number": self._number,
            "boolean": self._boolean,
            "null": self._null,
        }
        if kind not in builders:
            raise SchemaError(f"unsupported JSON schema type {kind!r}")
        return builders[kind](node, name)

    def resolve(self, node: Any) -> dict:
        """The schema a node stands for, following $ref."""
        seen = set()
        while isinstance(node, dict) and "$ref" in node and node["$ref"] not in seen:
            seen.add(node["$ref"])
            node = self._lookup(node["$ref"])
        return node if isinstance(node, dict) else {}

    def _lookup(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise SchemaError(f"only local $ref (starting with '#') are supported, got {ref!r}")
        node = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise SchemaError(f"$ref {ref!r} points to nothing in the schema")
            node = node[part]
        return node

    def _ref(self, ref: str, name: str) -> _Generate:
        key = (ref, name)
        refs = self.refs
        if key not in refs:
            # A recursive schema meets this ref again while compiling it: the lambda below
            # looks the generator up only when called, by which time it is in place.
            refs[key] = self._unfinished
            refs[key] = self.compile(self._lookup(ref), name)
        return lambda draw: refs[key](draw)

    @staticmethod
    def _unfinished(draw: _Draw) -> Any:
        raise SchemaError("a $ref was used before it was compiled")

    def _enum_width(self, node: Any) -> int | None:
        """How many values an array item can take: its own enum, or the enum of its first enum field."""
        node = self.resolve(node)
        if "enum" in node:
            return len(node["enum"])
        for sub in node.get("properties", {}).values():
            if "enum" in self.resolve(sub):
                return len(self.resolve(sub)["enum"])
        return None

    @staticmethod
    def _enum(values: list[Any]) -> _Generate:
        def generate(draw: _Draw) -> Any:
            return draw.kind if draw.kind in values else values[draw.item % len(values)]

        return generate

    def _object(self, node: dict, name: str) -> _Generate:
        properties: dict[str, Any] = node.get("properties", {})
        required = set(node.get("required", properties))
        fields = [(prop, self.compile(sub, prop), prop in required) for prop, sub in properties.items()]
        # The first enum field (a question type, say) is drawn first so sibling strings can follow it.
        kind_field = next((prop for prop, sub in properties.items() if "enum" in self.resolve(sub)), None)
        kind_generate = dict((prop, generate) for prop, generate, _ in fields).get(kind_field)
        # Object-valued fields are slots (one QA pair per question type): each is about another sentence.
        slots = {
            prop: index
            for index, prop in enumerate(p for p, sub in properties.items() if self.resolve(sub).get("type") == "object")
        }

        def generate(draw: _Draw) -> dict[str, Any]:
            inner = _Draw(draw.material, draw.item, None, draw.depth + 1)
            if kind_generate is not None:
                inner.kind = kind_generate(inner)
            shallow = draw.depth < _MAX_DEPTH
            values = {}
            for prop, each, needed in fields:
                if not (needed or shallow):
                    continue
                if prop == kind_field:
                    values[prop] = inner.kind
                elif prop in slots:
                    values[prop] = each(_Draw(draw.material, draw.item + slots[prop], None, draw.depth + 1))
                else:
                    values[prop] = each(inner)
            return values

        return generate

    def _array(self, node: dict, name: str) -> _Generate:
        items = node.get("items", {})
        low = int(node.get("minItems", 0))
        wanted = self._enum_width(items) or _DEFAULT_ARRAY_ITEMS
        if "maxItems" in node:
            wanted = min(wanted, int(node["maxItems"]))
        count = max(low, wanted)
        item = self.compile(items, name)

        evidence = bool(_EVIDENCE_FIELD.search(name))

        def generate(draw: _Draw) -> list[Any]:
            n = count if draw.depth < _MAX_DEPTH else low
            if evidence:  # quotes: the pair's own sentence first, then the one after it (of its hop's passage)
                n = max(low, min(n, 2))
                material = draw.material.hop(name)
                return [item(_Draw(material, draw.item + index, None, draw.depth + 1, parent_item=draw.item))
                        for index in range(n)]
            return [item(_Draw(draw.material, index, None, draw.depth + 1)) for index in range(n)]

        return generate

    @staticmethod
    def _string(node: dict, name: str) -> _Generate:
        low = int(node.get("minLength", 0))
        high = node.get("maxLength")
        example = _FORMAT_EXAMPLES.get(node.get("format", ""))
        question = bool(_QUESTION_FIELD.search(name))
        evidence = bool(_EVIDENCE_FIELD.search(name))

        def generate(draw: _Draw) -> str:
            if example is not None:
                return example
            if evidence:
                text = _quote(draw)
            elif question:
                template = _QUESTION_TEMPLATES.get(draw.kind or "factual", _QUESTION_TEMPLATES["factual"])
                text = template.format(topic=draw.material.topic(draw.item), other=draw.material.topic(draw.item + 1))
            else:
                # The first plain string of an object is the sentence its question was built from.
                text = draw.material.sentence(draw.item + draw.strings)
                draw.strings += 1
            while len(text) < low:
                text = f"{text} {text}"
            return text if high is None else text[: int(high)]

        return generate

    @staticmethod
    def _bounds(node: dict, step: float) -> tuple[float | None, float | None]:
        low, high = node.get("minimum"), node.get("maximum")
        if "exclusiveMinimum" in node:
            bound = node["exclusiveMinimum"] + step
            low = bound if low is None else max(low, bound)
        if "exclusiveMaximum" in node:
            bound = node["exclusiveMaximum"] - step
            high = bound if high is None else min(high, bound)
        return low, high

    def _integer(self, node: dict, name: str) -> _Generate:
        low, high = self._bounds(node, 1)

        def generate(draw: _Draw) -> int:
            return int(_clamp(draw.item + 1, low, high))

        return generate

    def _number(self, node: dict, name: str) -> _Generate:
        low, high = self._bounds(node, 0.5)

        def generate(draw: _Draw) -> float:
            return float(_clamp(draw.item + 0.5, low, high))

        return generate

    @staticmethod
    def _boolean(node: dict, name: str) -> _Generate:
        return lambda draw: draw.item % 2 == 0

    @staticmethod
    def _null(node: dict, name: str) -> _Generate:
        return lambda draw: None


def _quote(draw: _Draw) -> str:
    """An evidence quote: the passage's sentence as it is, reworded, or made up (see evidence_kind)."""
    material = draw.material
    sentence = material.sentence(draw.item)
    kind = evidence_kind(material.passage, draw.parent_item, draw.item - draw.parent_item, material.evidence)
    if kind == "paraphrased":
        return _paraphrased(sentence, draw.item)
    if kind == "invented":
        return _invented(material.topic(draw.item), draw.item + draw.parent_item)
    return sentence


def _clamp(value: float, low: float | None, high: float | None) -> float:
    if low is not None:
        value = max(value, low)
    if high is not None:
        value = min(value, high)
    return value


@lru_cache(maxsize=256)
def _schema_generator(schema_key: str) -> _Generate:
    """The generator for a schema, compiled once per distinct schema text."""
    schema = json.loads(schema_key)
    return _SchemaCompiler(schema).compile(schema)


@lru_cache(maxsize=4096)
def render(
    schema_key: str, passage: str, evidence: EvidenceRates = EvidenceRates(), hops: tuple[str, ...] = ()
) -> str:
    """The JSON answer for one passage (or, with `hops`, for a multi-hop prompt's passages, `passage`
    being all of them); cached because clients re-send the same chunks."""
    material = _material(passage, evidence, hops)
    return json.dumps(_schema_generator(schema_key)(_Draw(material)), ensure_ascii=False)


# Without a schema in the request, the answer has the shape the project's prompt asks for.
QA_SCHEMA_KEY = json.dumps(qa_schema(question_types_described()))


def drop_a_field(value: Any) -> Any:
    """The instance with one field missing: "answer" of the first object that has one (a QA pair, in a
    list or a slot), else the first field of the first object in an array, else of the instance."""
    target = _first_object(value, lambda obj: "answer" in obj) or _first_item_object(value)
    target = target or (value if isinstance(value, dict) else None)
    if target:
        target.pop("answer" if "answer" in target else next(iter(target)))
    return value


def _first_object(value: Any, wanted: Callable[[dict], bool]) -> dict | None:
    """The first object, depth first, that `wanted` accepts."""
    if isinstance(value, dict) and wanted(value):
        return value
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        found = _first_object(child, wanted)
        if found is not None:
            return found
    return None


def _first_item_object(value: Any) -> dict | None:
    if isinstance(value, list):
        for element in value:
            if isinstance(element, dict) and element:
                return element
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        found = _first_item_object(child)
        if found is not None:
            return found
    return None
