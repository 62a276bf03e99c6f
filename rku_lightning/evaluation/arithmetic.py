"""Arithmetic inside a chain of thought: is each written step ``a op b = c`` computed right?

A wrong final answer has two causes that pruning can produce: a wrong plan (the wrong operations) or
wrong arithmetic on the written operands. Checking the binary steps a generation writes out (``16 - 3 = 13``,
GSM8K's ``<<16-3=13>>``, LaTeX ``\\times`` / ``\\div``) separates the two without a grader model.
Only single binary steps with a single-number result are checked: in ``2 + 3 * 4 = 14`` or ``= 5 + 2``
the step is part of a longer expression and is skipped, not guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUM = r"\$?\s?(\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?)"
# One unit word after an operand, as in `60 mph * 2 hours = 120 miles`.
_UNIT = r"(?:\s+[A-Za-z]{1,12}(?:/[A-Za-z]{1,12})?)?"
# Not preceded by an operand, operator or bracket of a longer expression; the result not followed by one.
_STEP_RE = re.compile(
    rf"(?<![\w.,)}}*/+\-(])(?<!\$)(?<![*/+\-)]\s){_NUM}{_UNIT}\s*([*/+\-]|\sx\s)\s*{_NUM}{_UNIT}\s*=\s*{_NUM}"
    r"(?![\d.,]*\d)(?!\s*(?:[*/+\-(%]|x\s))"
)
# Written forms made plain first: LaTeX (`\( 2 + 1 = 3 \)`, `\frac{230}{2}`, `60 \text{ m} \times 3`), Unicode signs.
_PLAIN = (
    (re.compile(r"\\[dt]?frac\s*\{\s*(\d+(?:\.\d+)?)\s*\}\s*\{\s*(\d+(?:\.\d+)?)\s*\}"), r"\1 / \2"),
    (re.compile(r"\\times|\\cdot|\u00d7"), "*"),
    (re.compile(r"\\div|\u00f7"), "/"),
    (re.compile(r"\u2212"), "-"),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\text\{[^{}]*\}|\\[()\[\],;! ]"), " "),
    (re.compile(r"\\\$"), "$"),
)


@dataclass(frozen=True)
class Step:
    """One written binary step and whether its result is right (to the precision the result is written in)."""

    left: float
    op: str
    right: float
    result: float
    correct: bool


def _value(text: str) -> float:
    return float(text.replace(",", ""))


def _computed(left: float, op: str, right: float) -> float | None:
    if op == "/":
        return None if right == 0 else left / right
    return left + right if op == "+" else left - right if op == "-" else left * right


def written_steps(text: str) -> list[Step]:
    """Every checkable binary step in `text`, in order."""
    for pattern, replacement in _PLAIN:
        text = pattern.sub(replacement, text)
    steps = []
    for match in _STEP_RE.finditer(text):
        left, op, right, result = match.group(1), match.group(2).strip().replace("x", "*"), match.group(3), match.group(4)
        value = _computed(_value(left), op, _value(right))
        if value is None:
            continue
        decimals = len(result.partition(".")[2])
        # A result written with d decimals is right when it is the exact value rounded to d decimals.
        correct = abs(value - _value(result)) <= 0.5 * 10.0**-decimals + 1e-9
        steps.append(Step(_value(left), op, _value(right), _value(result), correct))
    return steps

