"""Final-answer extraction on generations as models really write them."""

from __future__ import annotations

import pytest

from rku_lightning.evaluation.metrics import answers_match, extract_answer, parse_number

CASES = [
    # GSM8K format
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", 18),
    ("#### 1,450,000", 1450000),
    ("So the total is 12.\n####12", 12),
    ("#### $70,000.", 70000),
    ("#### -3", -3),
    ("First 5 + 5 = 10.\n#### 10\nThen 7 more questions follow: 3, 4.", 10),
    ("#### 3/4", 0.75),
    ("#### 2.50 dollars", 2.5),
    # \boxed
    ("Adding them up gives $5 + 7 = 12$. The final answer is $\\boxed{12}$.", 12),
    ("\\boxed{\\frac{3}{4}}", 0.75),
    ("\\boxed{\\dfrac{1}{2}} of the pie", 0.5),
    ("Therefore \\boxed{\\$1,234.56}", 1234.56),
    ("The answer is \\boxed{50\\%}", 50),
    ("We get \\boxed{-\\frac{1}{4}}", -0.25),
    ("\\boxed{18 \\text{ dollars}}", 18),
    ("First \\boxed{3}, wait, correcting: \\boxed{4}", 4),
    ("\\boxed{x} so the number of apples is 7", 7),
    # "the answer is"
    ("She has 3 + 4 = 7 apples. The answer is 7.", 7),
    ("The answer is: $18. She made 2 trips.", 18),
    ("Final answer: 42", 42),
    ("**Answer:** 1,000 people", 1000),
    ("So the final answer is 12 dollars per hour, for 8 hours.", 12),
    ("The answer is -5 degrees.", -5),
    ("ANSWER = 0.5", 0.5),
    # last number
    ("16 - 3 - 4 = 9 eggs, and 9 * 2 = 18", 18),
    ("He pays $1,200 a month, so $14,400 a year.", 14400),
    ("It is 25% of the price, which is 30.", 30),
    ("The temperature dropped to -12", -12),
    ("Each friend gets 3/4 of a pizza", 0.75),
    ("She runs 5 km/h", 5),
    ("They need 16 - 3 more", 3),
    ("The result is 7.5.", 7.5),
    ("That costs .5 dollars", 0.5),
    ("Profit = 80,000 - 40,000 = 40,000.", 40000),
    ("The cost went from 5-7 hours x2 = 14", 14),
    ("It had −4 points", -4),
]

NO_ANSWER = ["", "I don't know.", "Let me think step by step.", "#### \\boxed{} the answer is unknown"]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_extracts_final_answer(text: str, expected: float) -> None:
    assert answers_match(extract_answer(text), expected), (text, extract_answer(text))


@pytest.mark.parametrize("text", NO_ANSWER)
def test_no_answer_is_none(text: str) -> None:
    assert extract_answer(text) is None


def test_enough_cases() -> None:
    assert len(CASES) + len(NO_ANSWER) >= 30


def test_rule_order_prefers_hashes_over_boxed_over_phrase_over_last_number() -> None:
    assert extract_answer("\\boxed{2} The answer is 3. #### 1 then 4") == 1
    assert extract_answer("The answer is 3. \\boxed{2} then 4") == 2
    assert extract_answer("The answer is 3. Then 4") == 3


@pytest.mark.parametrize(("text", "expected"), [("1,450,000", 1450000), ("18", 18), (51.0, 51), (7, 7), ("$2.50", 2.5)])
def test_parse_number_reads_gold_answers(text, expected) -> None:
    assert parse_number(text) == expected


def test_parse_number_rejects_non_numbers() -> None:
    assert parse_number("seven") is None
    assert parse_number(True) is None
    assert parse_number(float("nan")) is None


def test_match_tolerates_round_off_only() -> None:
    assert answers_match(0.1 + 0.2, 0.3)
    assert not answers_match(18.01, 18)
    assert not answers_match(None, 18)


def test_extract_answer_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="text"):
        extract_answer(18)  # type: ignore[arg-type]
