"""The written-step checker that separates wrong arithmetic from a wrong plan (benchmarks' answer diagnosis)."""

import pytest

from rku_lightning.evaluation.arithmetic import written_steps


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16 - 3 = 13", [(16, "-", 3, 13, True)]),
        ("<<16+3=49>>49", [(16, "+", 3, 49, False)]),  # GSM8K's calculator annotation, computed wrong
        ("So 2 + 1 = 4.", [(2, "+", 1, 4, False)]),
        ("\\( 2 + 1 = 3 \\)", [(2, "+", 1, 3, True)]),
        ("\\(60 \\text{ meters} \\times 3 \\text{ sprints} = 180 \\text{ meters}\\)", [(60, "*", 3, 180, True)]),
        ("\\(\\frac{230}{2} = 115\\)", [(230, "/", 2, 115, True)]),
        ("$80,000 \\times 1.5 = 120,000$", [(80000, "*", 1.5, 120000, True)]),
        ("60 mph × 2 hours = 120 miles", [(60, "*", 2, 120, True)]),
        ("3 x 4 = 12 eggs", [(3, "*", 4, 12, True)]),
        ("10 / 3 = 3.33", [(10, "/", 3, 3.33, True)]),  # right to the two decimals written
        ("10 / 3 = 3.3", [(10, "/", 3, 3.3, True)]),
        ("10 / 3 = 3.4", [(10, "/", 3, 3.4, False)]),
        ("12 * 7 = 84 and 84 - 4 = 81", [(12, "*", 7, 84, True), (84, "-", 4, 81, False)]),
    ],
)
def test_checks_binary_steps(text: str, expected: list) -> None:
    assert [(s.left, s.op, s.right, s.result, s.correct) for s in written_steps(text)] == expected


@pytest.mark.parametrize(
    "text",
    [
        "2 + 3 * 4 = 14",  # part of a longer expression: the step is skipped, not guessed
        "20 \\times 3 \\times 4 = 240",
        "(5 + 2) * 3 = 21",
        "1.5 * 3 = 4.5 + 1",
        "x = 5 + 2",
        "2 + 3 = 5%",
        "5 / 0 = 7",
        "no arithmetic here",
    ],
)
def test_skips_what_is_not_a_single_binary_step(text: str) -> None:
    assert written_steps(text) == []

