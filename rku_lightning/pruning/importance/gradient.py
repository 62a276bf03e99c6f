"""Gradient-based importances: all read the gate-gradient moments E|G|, E[G^2], E[G] of calibration."""

from __future__ import annotations

import torch

from rku_lightning.pruning.families import LayerView
from rku_lightning.pruning.statistics import CalibrationStatistics
from rku_lightning.pruning.structures import UnitKind

from .base import Importance, register_importance


@register_importance
class KineticUtility(Importance):
    """Raw kinetic utility U_s = E_x |G_s(x)|: RKU without the Fisher-trace normalisation (the ablation)."""

    name = "kinetic"
    needs_gradients = True

    def layer_scores(self, view: LayerView, kind: UnitKind, stats: CalibrationStatistics, alive: torch.Tensor):
        return stats.gradients(kind, view.index).abs_mean.clone()


@register_importance
class RelativeKineticUtility(Importance):
    """RKU_s = U_s / sqrt(T_l + eps), T_l = mean over the block's live units of E_x G_s(x)^2.

    Dividing by the block's Fisher trace removes the block-common gradient scale (deep layers and
    attention see larger or smaller gradients than shallow MLPs), so that blocks compete globally.
    """

    name = "rku"
    needs_gradients = True

    def __init__(self, eps: float = 1e-20, seed: int = 0):
        super().__init__(seed)
        self.eps = eps

    def layer_scores(self, view: LayerView, kind: UnitKind, stats: CalibrationStatistics, alive: torch.Tensor):
        moments = stats.gradients(kind, view.index)
        trace = moments.sq_mean[alive].mean() if bool(alive.any()) else moments.sq_mean.mean()
        return moments.abs_mean / torch.sqrt(trace + self.eps)


@register_importance
class Taylor(Importance):
    """First-order Taylor, LLM-Pruner "vector" style: |E_x G_s(x)| (the loss change of removing s)."""

    name = "taylor"
    needs_gradients = True

    def layer_scores(self, view: LayerView, kind: UnitKind, stats: CalibrationStatistics, alive: torch.Tensor):
        return stats.gradients(kind, view.index).mean.abs()
