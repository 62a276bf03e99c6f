"""Importances that need no calibration data: weight magnitude and a seeded random control."""

from __future__ import annotations

import torch

from rku_lightning.pruning.families import LayerView
from rku_lightning.pruning.statistics import CalibrationStatistics
from rku_lightning.pruning.structures import UNIT_KINDS, UnitKind, num_units, unit_sums

from .base import Importance, register_importance


@register_importance
class Magnitude(Importance):
    """L2 norm of every weight (and bias) the structure owns."""

    name = "magnitude"

    def layer_scores(self, view: LayerView, kind: UnitKind, stats: CalibrationStatistics, alive: torch.Tensor):
        def rows(linear, source):
            sq = linear.weight.detach().double().cpu().pow(2).sum(1)
            return sq if linear.bias is None else sq + linear.bias.detach().double().cpu().pow(2)

        def cols(linear, source):
            return linear.weight.detach().double().cpu().pow(2).sum(0)

        return unit_sums(view, kind, rows, cols).sqrt()


@register_importance
class RandomImportance(Importance):
    """Uniform random scores from a generator seeded by (seed, layer, kind): the floor every method must beat."""

    name = "random"

    def layer_scores(self, view: LayerView, kind: UnitKind, stats: CalibrationStatistics, alive: torch.Tensor):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + view.index * 7 + UNIT_KINDS.index(kind))
        return torch.rand(num_units(view, kind), generator=generator, dtype=torch.float64)
