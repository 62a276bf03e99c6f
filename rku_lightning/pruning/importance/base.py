"""The one interface every scoring method implements, and the explicit registry that names them."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import ClassVar, TypeVar

import torch

from rku_lightning.pruning.families import LayerView
from rku_lightning.pruning.statistics import CalibrationStatistics
from rku_lightning.pruning.structures import UnitKind

IMPORTANCES: dict[str, type["Importance"]] = {}
I = TypeVar("I", bound=type["Importance"])  # noqa: E741


class Importance(ABC):
    """Scores the units of one kind in one layer; higher means more important (pruned last).

    A subclass is usable at once as an instance (`StructuredPruner(model, importance=MyScorer())`,
    or a `class_path` in a config); `register_importance` also makes it available by name.
    """

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = False

    def __init__(self, seed: int = 0):
        # Every method takes the run's seed, so that the pruner builds any registered name the same way;
        # only methods that draw random numbers use it.
        self.seed = seed

    @property
    def needs_calibration(self) -> bool:
        return self.needs_gradients or self.needs_activations

    @abstractmethod
    def layer_scores(
        self, view: LayerView, kind: UnitKind, stats: CalibrationStatistics, alive: torch.Tensor
    ) -> torch.Tensor:
        """Scores [units] (float64) for `kind` units of `view`; `alive` marks units not yet pruned."""


def register_importance(cls: I) -> I:
    """Class decorator: make `cls` available as `importance=cls.name` (built as `cls(seed=seed)`).

    A name that is already registered is an error: subclassing a method must not replace it.
    """
    if not (isinstance(cls, type) and issubclass(cls, Importance)) or inspect.isabstract(cls):
        raise TypeError(f"register_importance: {cls!r} must be a concrete Importance subclass (implement layer_scores)")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_importance: {cls.__name__}.name must be a non-empty string, got {name!r}")
    if name in IMPORTANCES:
        raise ValueError(
            f"register_importance: name {name!r} of {cls.__name__} is already taken by {IMPORTANCES[name].__name__}; "
            "give the new method its own name"
        )
    IMPORTANCES[name] = cls
    return cls


def check_importance(importance: object) -> None:
    """Raise the one error for an importance that is neither a registered name nor an `Importance` instance."""
    if not isinstance(importance, Importance) and importance not in IMPORTANCES:
        raise ValueError(
            f"importance must be one of {sorted(IMPORTANCES)} or an Importance instance "
            f"(in a config: class_path and init_args), got {importance!r}"
        )


def get_importance(importance: str | Importance, seed: int = 0) -> Importance:
    """The instance itself, or the registered method of that name seeded with `seed`."""
    check_importance(importance)
    if isinstance(importance, Importance):
        return importance
    return IMPORTANCES[importance](seed=seed)
