"""Running calibration statistics: sums only, so memory does not grow with the number of samples.

Gradient statistics hold, per layer and unit kind, the running sums over calibration samples x of
|G_s(x)|, G_s(x)^2 and G_s(x), where G_s(x) is the gradient of the objective with respect to the
structure's gate. Activation statistics hold, per layer and projection input, the running sums of x
and x^2 over non-padding tokens. Everything is additive, which makes DDP a single all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .structures import UNIT_KINDS, UnitKind

GRAD_FIELDS = ("abs", "sq", "sum")


@dataclass(frozen=True)
class GradientMoments:
    """Per-unit means over calibration samples: E|G|, E[G^2], E[G]."""

    abs_mean: torch.Tensor
    sq_mean: torch.Tensor
    mean: torch.Tensor


@dataclass(frozen=True)
class ActivationMoments:
    """Per-feature moments over calibration tokens: mean, variance, root mean square."""

    mean: torch.Tensor
    var: torch.Tensor
    rms: torch.Tensor


class CalibrationStatistics:
    """Accumulates gradient and activation sums; `state_dict` / `all_reduce_` for resume and DDP."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    @property
    def has_gradients(self) -> bool:
        return any(key.startswith("grad.") for key in self.counts)

    @property
    def has_activations(self) -> bool:
        return any(key.startswith("act.") for key in self.counts)

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to(device="cpu", dtype=torch.float64)
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.clone()

    def add_gradients(self, kind: UnitKind, layer: int, grads: torch.Tensor) -> None:
        """Add per-sample gate gradients `grads` of shape [samples, units]."""
        grads = grads.detach().double()
        prefix = f"grad.{kind}.{layer}"
        self._add(f"{prefix}.abs", grads.abs().sum(0))
        self._add(f"{prefix}.sq", grads.pow(2).sum(0))
        self._add(f"{prefix}.sum", grads.sum(0))
        self.counts[prefix] = self.counts.get(prefix, 0.0) + grads.shape[0]

    def add_activations(self, source: str, layer: int, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        """Add the inputs `x` [batch, tokens, features] of one projection, skipping padding tokens."""
        with torch.no_grad():
            flat = x.detach().reshape(-1, x.shape[-1])
            if token_mask is not None and token_mask.numel() == flat.shape[0]:
                flat = flat[token_mask.reshape(-1).bool()]
            flat = flat.double()
            prefix = f"act.{source}.{layer}"
            self._add(f"{prefix}.sum", flat.sum(0))
            self._add(f"{prefix}.sq", flat.pow(2).sum(0))
            self.counts[prefix] = self.counts.get(prefix, 0.0) + flat.shape[0]

    def gradients(self, kind: UnitKind, layer: int) -> GradientMoments:
        prefix = f"grad.{kind}.{layer}"
        if prefix not in self.counts:
            raise KeyError(f"no gradient statistics for {kind} units of layer {layer}; run calibrate() first")
        n = self.counts[prefix]
        return GradientMoments(*(self.sums[f"{prefix}.{f}"] / n for f in GRAD_FIELDS))

    def activations(self, source: str, layer: int) -> ActivationMoments:
        prefix = f"act.{source}.{layer}"
        if prefix not in self.counts:
            raise KeyError(f"no activation statistics for {source} of layer {layer}; run calibrate() first")
        n = self.counts[prefix]
        mean = self.sums[f"{prefix}.sum"] / n
        second = self.sums[f"{prefix}.sq"] / n
        return ActivationMoments(mean=mean, var=(second - mean.pow(2)).clamp_min(0), rms=second.sqrt())

    def num_samples(self) -> int:
        grads = [n for key, n in self.counts.items() if key.startswith("grad.")]
        return int(max(grads)) if grads else 0

    def state_dict(self) -> dict:
        return {"sums": {k: v.clone() for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: v.clone().double() for k, v in state["sums"].items()}
        self.counts = dict(state["counts"])

    def all_reduce_(self) -> None:
        """Sum every statistic across DDP ranks (a no-op outside `torch.distributed`)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        keys = sorted(self.sums)
        # Every rank must hold the same keys; a mismatch means ranks calibrated different structures.
        gathered: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, keys)
        if any(g != keys for g in gathered):
            raise RuntimeError("calibration statistics differ in layout across ranks; every rank must calibrate")
        for key in keys:
            buf = self.sums[key].to(backend_device)
            dist.all_reduce(buf)
            self.sums[key] = buf.cpu()
        count_keys = sorted(self.counts)
        counts = torch.tensor([self.counts[k] for k in count_keys], dtype=torch.float64, device=backend_device)
        dist.all_reduce(counts)
        self.counts = dict(zip(count_keys, counts.cpu().tolist()))


__all__ = ["CalibrationStatistics", "GradientMoments", "ActivationMoments", "UNIT_KINDS"]
