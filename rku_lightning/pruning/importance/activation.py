"""Activation-aware importances (Wanda-sp, FLAP): weights weighed by the statistics of their inputs."""

from __future__ import annotations

import torch

from rku_lightning.pruning.families import LayerView
from rku_lightning.pruning.statistics import CalibrationStatistics
from rku_lightning.pruning.structures import UnitKind, unit_sums

from .base import Importance, register_importance


@register_importance
class WandaSP(Importance):
    """Sum over the structure's weights of |W_ij| * ||X_j|| (X_j: the weight's input feature over tokens)."""

    name = "wanda_sp"
    needs_activations = True

    def layer_scores(self, view: LayerView, kind: UnitKind, stats: CalibrationStatistics, alive: torch.Tensor):
        def norm(source: str) -> torch.Tensor:
            return stats.activations(source, view.index).rms

        def rows(linear, source):
            return (linear.weight.detach().abs().double().cpu() * norm(source)[None, :]).sum(1)

        def cols(linear, source):
            return (linear.weight.detach().abs().double().cpu() * norm(source)[None, :]).sum(0)

        return unit_sums(view, kind, rows, cols)


@register_importance
class FLAP(Importance):
    """Fluctuation: Var(X_j) * ||W_:,j||^2 over the structure's output-projection columns, standardised per layer.

    Standardisation (over the layer's live units) is what lets FLAP compare layers globally.
    """

    name = "flap"
    needs_activations = True

    def layer_scores(self, view: LayerView, kind: UnitKind, stats: CalibrationStatistics, alive: torch.Tensor):
        def rows(linear, source):
            return torch.zeros(linear.out_features, dtype=torch.float64)

        def cols(linear, source):
            var = stats.activations(source, view.index).var
            return var * linear.weight.detach().double().cpu().pow(2).sum(0)

        raw = unit_sums(view, kind, rows, cols)
        live = raw[alive] if bool(alive.any()) else raw
        std = live.std() if live.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
        return (raw - live.mean()) / (std + 1e-12)
