"""Structure gates: multiplicative masks on the inputs of `down_proj` (MLP channels) and `o_proj` (heads).

A gate of 1 keeps a structure, 0 removes it from the computation (masking). While scoring, the
gates are replaced by per-sample leaf tensors that require gradients, so that the gradient of the
objective with respect to gate s of sample x is G_s(x) = sum over the structure's units and tokens
of activation x gradient. Only these tensors need gradients: base weights stay frozen.

Hooks are attached to whatever module sits at each projection when `attach()` runs, so a peft LoRA
wrapper is gated as a whole (its LoRA branch sees the gated input too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable

import torch
from torch import nn

from .families import ModelFamily
from .structures import ATTN_IN, DOWN_IN, MLP_IN, O_IN, UnitKind

Recorder = Callable[[str, int, torch.Tensor], None]


class StructureGates:
    """0/1 masks per layer (`mlp[i]`: [channels], `heads[i]`: [query heads]) and the hooks that apply them."""

    def __init__(self, family: ModelFamily):
        self.family = family
        views = family.views()
        self.mlp: list[torch.Tensor] = [torch.ones(v.num_channels) for v in views]
        self.heads: list[torch.Tensor] = [torch.ones(v.num_heads) for v in views]
        self.head_dim: list[int] = [v.head_dim for v in views]
        self.scoring: dict[UnitKind, list[torch.Tensor]] | None = None
        self.recorder: Recorder | None = None
        #: How the masks were made (method, allocation, rounds); written into `pruning.json` on export.
        self.info: dict = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hooked: list[nn.Module] = []

    # -- hooks -----------------------------------------------------------------------------------
    def _targets(self) -> list[tuple[nn.Module, str, int]]:
        targets = []
        for view in self.family.views():
            targets += [(view.mlp_rows[0], MLP_IN, view.index), (view.q, ATTN_IN, view.index)]
            targets += [(view.mlp_out, DOWN_IN, view.index), (view.o, O_IN, view.index)]
        return targets

    def attach(self) -> None:
        """(Re)register the hooks on the modules currently in the model; idempotent."""
        targets = self._targets()
        if [t[0] for t in targets] == self._hooked:
            return
        self.detach()
        for module, source, index in targets:
            self._handles.append(module.register_forward_pre_hook(self._make_hook(source, index)))
        self._hooked = [t[0] for t in targets]

    @contextlib.contextmanager
    def recording_paused(self) -> Iterator[None]:
        """No activation statistics inside the block (a checkpointed layer's recomputation)."""
        recorder, self.recorder = self.recorder, None
        try:
            yield
        finally:
            self.recorder = recorder

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], []

    def _make_hook(self, source: str, index: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if self.recorder is not None:
                self.recorder(source, index, x)
            if source == DOWN_IN:
                return (self._gate_mlp(x, index),) + args[1:]
            if source == O_IN:
                return (self._gate_heads(x, index),) + args[1:]
            return None

        return hook

    def _masks(self, kind: UnitKind) -> list[torch.Tensor]:
        return self.mlp if kind == "mlp" else self.heads

    def _gate(self, kind: UnitKind, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """The gate to apply: a per-sample scoring gate [batch, units], a mask [units], or None (all ones)."""
        if self.scoring is not None:
            return self.scoring[kind][index]
        mask = self._masks(kind)[index]
        if bool((mask == 1).all()):
            return None
        if mask.device != x.device:
            mask = mask.to(x.device)
            self._masks(kind)[index] = mask
        return mask

    def _gate_mlp(self, x: torch.Tensor, index: int) -> torch.Tensor:
        gate = self._gate("mlp", index, x)
        if gate is None:
            return x
        return x * (gate[:, None, :] if gate.dim() == 2 else gate).to(x.dtype)

    def _gate_heads(self, x: torch.Tensor, index: int) -> torch.Tensor:
        gate = self._gate("head", index, x)
        if gate is None:
            return x
        d = self.head_dim[index]
        shaped = x.view(*x.shape[:-1], x.shape[-1] // d, d)
        g = gate[:, None, :, None] if gate.dim() == 2 else gate[:, None]
        return (shaped * g.to(x.dtype)).view_as(x)

    # -- scoring gates ---------------------------------------------------------------------------
    def start_scoring(self, batch_size: int, device: torch.device) -> dict[UnitKind, list[torch.Tensor]]:
        """Per-sample leaf gates equal to the current masks, keyed by unit kind as statistics are; their `.grad` is G_s(x)."""
        self.scoring = {
            kind: [m.to(device).expand(batch_size, -1).clone().requires_grad_(True) for m in self._masks(kind)]
            for kind in ("mlp", "head")
        }
        return self.scoring

    def stop_scoring(self) -> None:
        self.scoring = None

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"mlp": [m.cpu().clone() for m in self.mlp], "heads": [m.cpu().clone() for m in self.heads]}

    def load_state_dict(self, state: dict) -> None:
        for name in ("mlp", "heads"):
            current = getattr(self, name)
            loaded = state[name]
            if [m.numel() for m in loaded] != [m.numel() for m in current]:
                raise ValueError(f"mask shapes in the state do not match this model's {name} structures")
            setattr(self, name, [m.clone().float() for m in loaded])
