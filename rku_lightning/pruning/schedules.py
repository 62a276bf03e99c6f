"""Sparsity schedules for iterative pruning: which sparsity round r of R prunes to.

Pruning a little at a time and recovering in between loses less than pruning once; the cubic
schedule (Zhu & Gupta, 2017) removes most structures early, while the model still has redundancy
to absorb it, and takes small steps near the target.
"""

from __future__ import annotations

from typing import Literal, get_args

from rku_lightning.checks import fraction, one_of, positive_int

Schedule = Literal["cubic", "linear", "constant"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def check_schedule(target: float, rounds: int, schedule: str) -> None:
    """Raise ValueError naming the field when a schedule's arguments are out of range."""
    fraction("target_sparsity", target, open_low=True)
    positive_int("rounds", rounds)
    one_of("schedule", schedule, SCHEDULES)


def sparsity_at(round_index: int, target: float, rounds: int, schedule: Schedule = "cubic") -> float:
    """Sparsity after round `round_index` (1-based) of `rounds`; the last round reaches `target`.

    cubic: s_r = s_T (1 - (1 - r/R)^3); linear: s_r = s_T r/R; constant: s_T from round 1 on (one
    pruning step, the remaining rounds only recover).
    """
    check_schedule(target, rounds, schedule)
    if isinstance(round_index, bool) or not isinstance(round_index, int) or not 1 <= round_index <= rounds:
        raise ValueError(f"round_index must be an integer in [1, {rounds}], got {round_index!r}")
    progress = round_index / rounds
    if schedule == "cubic":
        return target * (1.0 - (1.0 - progress) ** 3)
    if schedule == "linear":
        return target * progress
    return float(target)


def sparsity_schedule(target: float, rounds: int, schedule: Schedule = "cubic") -> list[float]:
    """The sparsity of every round, 1..rounds (non-decreasing, ends at `target`)."""
    check_schedule(target, rounds, schedule)
    return [sparsity_at(r, target, rounds, schedule) for r in range(1, rounds + 1)]
