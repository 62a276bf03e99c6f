"""Argument checks shared by the engine, training and the CLIs: one rule and one message per kind of value.

Every message names the field, says what is allowed and shows the value that was given, so that a
config error can be fixed without reading the code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def positive_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    """`value` if it is an integer >= 1 (or None when `optional`); bools are refused although Python counts them as ints."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{' or None' if optional else ''}, got {value!r}")
    return value


def fraction(name: str, value: Any, *, open_low: bool = False) -> float:
    """`value` as a float if it is a number in [0, 1) ((0, 1) when `open_low`); NaN and bools are refused."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or not 0 <= value < 1
        or (open_low and value == 0)
    ):
        raise ValueError(f"{name} must be a number in {'(0, 1)' if open_low else '[0, 1)'}, got {value!r}")
    return float(value)


def one_of(name: str, value: Any, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices` (listed in the message in their given order)."""
    allowed = list(choices)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value
