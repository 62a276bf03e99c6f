"""The one interface every scoring method implements, and the registry that names them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from rku_lightning.pruning.families import LayerView
from rku_lightning.pruning.statistics import CalibrationStatistics
from rku_lightning.pruning.structures import UnitKind

IMPORTANCES: dict[str, type["Importance"]] = {}


class Importance(ABC):
    """Scores the units of one kind in one layer; higher means more important (pruned last)."""

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            IMPORTANCES[cls.name] = cls

    @property
    def needs_calibration(self) -> bool:
        return self.needs_gradients or self.needs_activations

    @abstractmethod
    def layer_scores(
        self, view: LayerView, kind: UnitKind, stats: CalibrationStatistics, alive: torch.Tensor
    ) -> torch.Tensor:
        """Scores [units] (float64) for `kind` units of `view`; `alive` marks units not yet pruned."""


def get_importance(importance: str | Importance, **kwargs) -> Importance:
    if isinstance(importance, Importance):
        return importance
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {sorted(IMPORTANCES)}, got {importance!r}")
    return IMPORTANCES[importance](**kwargs)
