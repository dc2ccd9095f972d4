"""The parser turns a server's answer into validated QA pairs or says precisely why it cannot."""

import json

import pytest

from qa_pipeline.core.prompts import (
    FailureReason,
    ParseError,
    build_messages,
    extract_passage,
    parse_pairs,
    question_types_described,
    response_format,
)

VALID = {
    "pairs": [
        {"question": "What does PEP 8 recommend for indentation?", "answer": "Four spaces.", "type": "factual"},
        {"question": "Why is consistency important?", "answer": "Code is read more often.", "type": "conceptual"},
        {"question": "How do tabs compare to spaces?", "answer": "Spaces are preferred.", "type": "comparison"},
    ]
}


def test_valid_json_gives_every_pair_with_its_type():
    pairs = parse_pairs(json.dumps(VALID))
    assert [p.type for p in pairs] == ["factual", "conceptual", "comparison"]
    assert pairs[0].answer == "Four spaces."


def test_fenced_json_with_prose_around_it_is_repaired():
    content = "Sure! Here are the pairs:\n```json\n" + json.dumps(VALID, indent=2) + "\n```\nHope this helps."
    assert len(parse_pairs(content)) == 3


def test_bare_list_of_pairs_is_accepted():
    assert len(parse_pairs(json.dumps(VALID["pairs"]))) == 3


def test_output_cut_by_max_tokens_is_reported_as_truncated():
    cut = json.dumps(VALID)[:80]
    with pytest.raises(ParseError) as error:
        parse_pairs(cut, finish_reason="length")
    assert error.value.reason is FailureReason.TRUNCATED


def test_cut_json_without_finish_reason_is_invalid_json_with_position():
    with pytest.raises(ParseError) as error:
        parse_pairs(json.dumps(VALID)[:80], finish_reason="stop")
    assert error.value.reason is FailureReason.INVALID_JSON
    assert "position" in error.value.detail


def test_missing_answer_names_the_field():
    broken = {"pairs": [{"question": "What is PEP 8?", "type": "factual"}]}
    with pytest.raises(ParseError) as error:
        parse_pairs(json.dumps(broken))
    assert error.value.reason is FailureReason.MISSING_FIELD
    assert "pairs.0.answer" in error.value.detail


def test_unknown_question_type_is_an_invalid_value():
    broken = {"pairs": [{"question": "What is PEP 8?", "answer": "A style guide.", "type": "opinion"}]}
    with pytest.raises(ParseError) as error:
        parse_pairs(json.dumps(broken))
    assert error.value.reason is FailureReason.INVALID_VALUE


@pytest.mark.parametrize("content", [None, "", "   \n"])
def test_empty_content_is_an_empty_response(content):
    with pytest.raises(ParseError) as error:
        parse_pairs(content)
    assert error.value.reason is FailureReason.EMPTY_RESPONSE


def test_prompt_carries_the_passage_and_section():
    messages = build_messages("Use four spaces per indentation level.", ["PEP 8", "Code Lay-out"])
    user = messages[-1]["content"]
    assert "Section: PEP 8 > Code Lay-out" in user
    assert extract_passage(user) == "Use four spaces per indentation level."


SLOTS = {
    "conceptual": {"question": "Why is consistency important?", "answer": "Code is read more often.",
                   "evidence": ["Code is read much more often than it is written."], "difficulty": "Medium"},
    "factual": {"question": "What does PEP 8 recommend for indentation?", "answer": "Four spaces.",
                "evidence": ["Use 4 spaces per indentation level."], "difficulty": "easy"},
    "comparison": {"type": "factual", "question": "How do tabs compare to spaces?", "answer": "Spaces are preferred.",
                   "evidence": ["Spaces are the preferred indentation method."], "difficulty": "hard"},
}


def test_schema_shaped_answer_gives_one_pair_per_requested_type_in_the_requested_order():
    pairs = parse_pairs(json.dumps(SLOTS))
    assert [p.type for p in pairs] == ["factual", "conceptual", "comparison"]
    assert [p.difficulty for p in pairs] == ["easy", "medium", "hard"]
    assert pairs[0].evidence == ["Use 4 spaces per indentation level."]


def test_schema_shaped_answer_missing_a_requested_type_names_the_type():
    answer = {kind: slot for kind, slot in SLOTS.items() if kind != "comparison"}
    with pytest.raises(ParseError) as error:
        parse_pairs(json.dumps(answer))
    assert error.value.reason is FailureReason.MISSING_FIELD
    assert "comparison" in error.value.detail


def test_a_bad_field_inside_a_slot_is_named_with_its_type():
    answer = {**SLOTS, "factual": {**SLOTS["factual"], "difficulty": "trivial"}}
    with pytest.raises(ParseError) as error:
        parse_pairs(json.dumps(answer))
    assert error.value.reason is FailureReason.INVALID_VALUE
    assert error.value.detail.startswith("factual.difficulty")


def test_schema_has_one_required_slot_per_type_in_order_with_its_description():
    described = question_types_described(["factual", "howto"], {"howto": "asks how to do a task the passage describes"})
    schema = response_format(question_types=described)["json_schema"]["schema"]
    assert list(schema["properties"]) == schema["required"] == ["factual", "howto"]
    howto = schema["properties"]["howto"]
    assert "asks how to do a task the passage describes" in howto["description"]
    assert howto["properties"]["type"]["enum"] == ["howto"]
    assert howto["properties"]["difficulty"]["enum"] == ["easy", "medium", "hard"]
    assert howto["properties"]["evidence"]["minItems"] == 1
    prompt = build_messages("Run the installer.", question_types=described)[-1]["content"]
    assert "- howto: asks how to do a task the passage describes" in prompt


def test_a_type_listed_twice_is_refused():
    with pytest.raises(ValueError, match="listed twice"):
        question_types_described(["factual", "factual"])
