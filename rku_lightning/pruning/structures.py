"""Per-structure sums over weights, written once for every family through `LayerView`.

A structure ("unit") is one of three kinds:
- `mlp`: an MLP channel (a row of each gate/up projection, a column of the down projection);
- `head`: a query head (its rows of q_proj, its columns of o_proj);
- `group`: a KV group (its rows of k_proj and v_proj) together with the query heads that share it.
A quantity defined per output row and per input column of each projection is summed into units.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from .families import LayerView, base_linear

UnitKind = Literal["mlp", "head", "group"]
UNIT_KINDS: tuple[str, ...] = ("mlp", "head", "group")

#: Where each projection's input comes from, as named in activation statistics.
MLP_IN, ATTN_IN, DOWN_IN, O_IN = "mlp_in", "attn_in", "down_in", "o_in"

RowFn = Callable[[torch.nn.Linear, str], torch.Tensor]  # (linear, input source) -> [out_features]
ColFn = Callable[[torch.nn.Linear, str], torch.Tensor]  # (linear, input source) -> [in_features]


def num_units(view: LayerView, kind: UnitKind) -> int:
    return {"mlp": view.num_channels, "head": view.num_heads, "group": view.num_groups}[kind]


def unit_sums(view: LayerView, kind: UnitKind, row_fn: RowFn, col_fn: ColFn) -> torch.Tensor:
    """Sum `row_fn` over each unit's output rows and `col_fn` over its input columns (float64)."""

    def rows(module, source):
        return row_fn(base_linear(module), source).double()

    def cols(module, source):
        return col_fn(base_linear(module), source).double()

    if kind == "mlp":
        return sum(rows(m, MLP_IN) for m in view.mlp_rows) + cols(view.mlp_out, DOWN_IN)
    d = view.head_dim
    heads = (rows(view.q, ATTN_IN) + cols(view.o, O_IN)).view(view.num_heads, d).sum(1)
    if kind == "head":
        return heads
    kv = sum(rows(m, ATTN_IN) for m in view.kv_rows).view(view.num_groups, d).sum(1)
    return heads.view(view.num_groups, view.heads_per_group).sum(1) + kv


def _row_params(linear: torch.nn.Linear, source: str) -> torch.Tensor:
    per_row = linear.in_features + (1 if linear.bias is not None else 0)
    return torch.full((linear.out_features,), float(per_row))


def _col_params(linear: torch.nn.Linear, source: str) -> torch.Tensor:
    return torch.full((linear.in_features,), float(linear.out_features))


def unit_param_counts(view: LayerView, kind: UnitKind) -> torch.Tensor:
    """Parameters that removing each unit deletes (rows, their biases, columns)."""
    return unit_sums(view, kind, _row_params, _col_params)


def head_param_count(view: LayerView) -> int:
    return int(unit_param_counts(view, "head")[0])


def kv_param_count(view: LayerView) -> int:
    """Parameters of one KV head alone (k and v rows with biases)."""
    return int(unit_param_counts(view, "group")[0]) - view.heads_per_group * head_param_count(view)


def base_param_count(module: torch.nn.Module) -> int:
    """Parameters of the model itself: LoRA adapters (peft's `lora_*` tensors) are training aids, not size."""
    return sum(p.numel() for name, p in module.named_parameters() if "lora_" not in name)
