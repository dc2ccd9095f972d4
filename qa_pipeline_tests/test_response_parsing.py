"""The parser turns a server's answer into validated QA pairs or says precisely why it cannot."""

import json

import pytest

from qa_pipeline.core.prompts import FailureReason, ParseError, build_messages, extract_passage, parse_pairs

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
