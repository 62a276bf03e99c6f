"""One settings object: the pruner, the callback and the prune CLI accept and refuse the same values alike,
and importances are registered explicitly."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import LowIndexFirst, tiny_model

from rku_lightning import StructuredPruner
from rku_lightning.callbacks import RKUPruning
from rku_lightning.cli.prune import cli as prune_cli
from rku_lightning.pruning.importance import (
    IMPORTANCES,
    Importance,
    RandomImportance,
    RelativeKineticUtility,
    register_importance,
)
from rku_lightning.pruning.objectives import OBJECTIVES, ObjectiveName
from rku_lightning.pruning.settings import PruningSettings


@pytest.mark.parametrize(
    "field, value, through_cli",
    [
        ("importance", "l1", True),
        ("allocation", "layerwise", True),
        ("objective", "mse", True),
        ("attention", "heads", True),
        ("min_mlp_keep", 1.0, True),
        ("min_mlp_keep", float("nan"), True),
        ("micro_batch_size", 0, True),
        ("micro_batch_size", 2.5, False),  # argparse's int type refuses 2.5 before the settings see it
        ("seed", 1.5, False),
    ],
)
def test_every_entry_point_refuses_a_bad_value_with_the_same_message(field, value, through_cli, tmp_path, capsys):
    with pytest.raises(ValueError) as settings:
        PruningSettings(**{field: value})
    message = str(settings.value)
    assert message.startswith(f"{field} must be")
    with pytest.raises(ValueError) as pruner:
        StructuredPruner(tiny_model("llama"), **{field: value})
    with pytest.raises(ValueError) as callback:
        RKUPruning(**{field: value})
    assert str(pruner.value) == str(callback.value) == message
    if through_cli:
        argv = ["--model", "never-loaded", "--sparsity", "0.3", "--out", str(tmp_path / "out"), f"--{field.replace('_', '-')}", str(value)]
        assert prune_cli(argv) == 2  # a usage error, printed on one line
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_defaults_are_the_settings_defaults():
    """The pruner's and callback's keywords are the settings' fields, with the same defaults."""
    defaults = PruningSettings().as_kwargs()
    for target in (StructuredPruner, RKUPruning):
        parameters = inspect.signature(target).parameters
        assert {name: parameters[name].default for name in defaults} == defaults, target.__name__


def test_the_pruner_and_the_callback_keep_each_value_in_its_field():
    values = dict(importance="taylor", allocation="joint", objective="hidden", attention="none", min_mlp_keep=0.2,
                  micro_batch_size=3, seed=5)
    expected = PruningSettings(**values)
    assert StructuredPruner(tiny_model("llama"), **values, progress=False).settings == expected
    assert RKUPruning(**values).settings == expected


def test_objective_literal_names_every_objective():
    assert set(OBJECTIVES) == set(ObjectiveName.__args__)


def test_the_seed_reaches_a_named_importance_and_an_instance_keeps_its_own():
    assert StructuredPruner(tiny_model("llama"), importance="random", seed=7, progress=False).importance.seed == 7
    assert PruningSettings(importance=RandomImportance(seed=3), seed=7).build_importance().seed == 3

    def masks(seed: int) -> list[torch.Tensor]:
        pruner = StructuredPruner(tiny_model("llama"), importance="random", seed=seed, progress=False)
        pruner.prune(0.3)
        return pruner.gates.mlp + pruner.gates.heads

    assert all(torch.equal(a, b) for a, b in zip(masks(1), masks(1)))
    assert not all(torch.equal(a, b) for a, b in zip(masks(1), masks(2)))


def test_a_custom_importance_instance_prunes_through_the_pruner():
    pruner = StructuredPruner(tiny_model("llama"), importance=LowIndexFirst(), attention="none", progress=False)
    report = pruner.prune(0.2)
    assert report.importance == "low_index_first" and "low_index_first" not in IMPORTANCES
    for mask in pruner.gates.mlp:
        removed = int((mask == 0).sum())
        assert removed > 0 and bool((mask[:removed] == 0).all()) and bool((mask[removed:] == 1).all())


def test_subclassing_a_method_does_not_replace_it():
    class Tuned(RelativeKineticUtility):
        pass

    assert IMPORTANCES["rku"] is RelativeKineticUtility
    with pytest.raises(ValueError, match="'rku' of Tuned is already taken by RelativeKineticUtility"):
        register_importance(Tuned)
    assert IMPORTANCES["rku"] is RelativeKineticUtility


def test_register_importance_makes_a_name_available_and_refuses_bad_classes():
    try:
        assert register_importance(LowIndexFirst) is LowIndexFirst
        assert StructuredPruner(tiny_model("llama"), importance="low_index_first", progress=False).importance.name == "low_index_first"
        with pytest.raises(ValueError, match="already taken"):
            register_importance(LowIndexFirst)
    finally:
        IMPORTANCES.pop("low_index_first", None)

    class Nameless(LowIndexFirst):
        name = ""

    with pytest.raises(ValueError, match="non-empty string"):
        register_importance(Nameless)
    with pytest.raises(TypeError, match="concrete Importance"):
        register_importance(Importance)
