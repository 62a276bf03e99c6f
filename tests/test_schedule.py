"""Sparsity schedules: values, monotonicity, end point, argument errors."""

import pytest

from rku_lightning.pruning.schedules import SCHEDULES, sparsity_at, sparsity_schedule


def test_cubic_matches_formula():
    values = sparsity_schedule(0.4, 4, "cubic")
    assert values == pytest.approx([0.4 * (1 - (1 - r / 4) ** 3) for r in range(1, 5)])
    assert values == pytest.approx([0.23125, 0.35, 0.39375, 0.4])


def test_linear_and_constant():
    assert sparsity_schedule(0.3, 3, "linear") == pytest.approx([0.1, 0.2, 0.3])
    assert sparsity_schedule(0.3, 3, "constant") == pytest.approx([0.3, 0.3, 0.3])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("rounds", [1, 2, 7])
def test_non_decreasing_and_ends_at_target(schedule, rounds):
    values = sparsity_schedule(0.37, rounds, schedule)
    assert len(values) == rounds
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.37)
    assert all(0 < v <= 0.37 + 1e-12 for v in values)


def test_cubic_front_loads():
    cubic, linear = sparsity_schedule(0.4, 4, "cubic"), sparsity_schedule(0.4, 4, "linear")
    assert all(c >= lin for c, lin in zip(cubic, linear))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target=0.0, rounds=2, schedule="cubic"), "target_sparsity"),
        (dict(target=1.0, rounds=2, schedule="cubic"), "target_sparsity"),
        (dict(target=0.4, rounds=0, schedule="cubic"), "rounds"),
        (dict(target=0.4, rounds=2.0, schedule="cubic"), "rounds"),
        (dict(target=0.4, rounds=2, schedule="exponential"), "schedule"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sparsity_schedule(**kwargs)


@pytest.mark.parametrize("round_index", [0, 5, True])
def test_round_index_out_of_range(round_index):
    with pytest.raises(ValueError, match="round_index"):
        sparsity_at(round_index, 0.4, 4)
