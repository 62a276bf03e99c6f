"""Physical removal: slice the weights of masked structures away so the model really shrinks.

The sliced model runs the family's unchanged forward code (generate and KV cache included): the
projections get new shapes and the attention module its new q-per-kv ratio; nothing else changes.
"""

from __future__ import annotations

import torch
from torch import nn

from .families import LayerView, ModelFamily, base_linear, get_family, unwrap_model
from .plan import LAYER_FIELDS, layer_shapes_uniform

PLAN_KEYS: tuple[str, ...] = tuple(LAYER_FIELDS)


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    weight = linear.weight.data
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        if linear.bias is not None:
            linear.bias = nn.Parameter(
                linear.bias.data.index_select(0, rows.to(weight.device)).clone(), linear.bias.requires_grad
            )
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    linear.weight = nn.Parameter(weight.clone(), linear.weight.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def keep_layer(family: ModelFamily, view: LayerView, channels: torch.Tensor, heads: torch.Tensor, groups: torch.Tensor) -> None:
    """Keep only these MLP channels, query heads and KV groups of one layer (indices into its current shapes)."""
    if heads.numel() % max(groups.numel(), 1) or groups.numel() == 0:
        raise ValueError(f"layer {view.index}: every kept KV group must keep the same number of query heads")
    for module in view.mlp_rows:
        _slice_linear(base_linear(module), rows=channels)
    _slice_linear(base_linear(view.mlp_out), cols=channels)
    head_rows = _head_rows(heads, view.head_dim)
    _slice_linear(base_linear(view.q), rows=head_rows)
    _slice_linear(base_linear(view.o), cols=head_rows)
    for module in view.kv_rows:
        _slice_linear(base_linear(module), rows=_head_rows(groups, view.head_dim))
    family.set_attention_shape(view, int(heads.numel()), int(groups.numel()))


def apply_plan(model: nn.Module, plan: dict) -> None:
    """Give a freshly built dense model the per-layer shapes recorded in `plan` (used when loading)."""
    family = get_family(model)
    for view, layer in zip(family.views(), plan["layers"]):
        keep_layer(family, view, *(torch.tensor(layer[k]) for k in PLAN_KEYS))


def conform_to_plan(model: nn.Module, plan: dict) -> None:
    """Slice `model` (dense, or compacted by an earlier plan) to the shapes of `plan`, so that a state dict
    saved from the model `plan` describes loads into it; a model that already has `plan` is left alone.

    A checkpoint of a pruned run holds compacted tensors; a module rebuilt from its hyperparameters holds
    the dense model (or the export it started from), so loading the checkpoint needs this first.
    """
    model = unwrap_model(model)
    current = getattr(model, "rku_pruning_plan", None)
    if current is not None and current["layers"] == plan["layers"]:
        return
    if getattr(model, "rku_gates", None) is not None:
        raise ValueError("conform_to_plan: the model holds pruning masks (a pruning run is in progress); a finished "
                         "run's checkpoint is loaded with load_from_checkpoint or trainer.test/validate, not resumed with fit")
    family = get_family(model)
    with torch.no_grad():
        for view, layer in zip(family.views(), plan["layers"]):
            kept = []
            for key in PLAN_KEYS:
                position = {index: i for i, index in enumerate(current["layers"][view.index][key])} if current else None
                missing = [i for i in layer[key] if position is not None and i not in position]
                if missing:
                    raise ValueError(f"conform_to_plan: layer {view.index} field '{key}': the model no longer has "
                                     f"original index {missing[0]}; it was pruned further than the checkpoint's plan")
                kept.append(torch.tensor(layer[key] if position is None else [position[i] for i in layer[key]]))
            keep_layer(family, view, *kept)
    _set_uniform_config(model, family, plan)
    model.rku_pruning_plan = plan


def is_compacted(model: nn.Module) -> bool:
    """Whether `model` is a finished pruned model: compacted (it carries its plan) and holding no masks."""
    model = unwrap_model(model)
    return getattr(model, "rku_pruning_plan", None) is not None and getattr(model, "rku_gates", None) is None


def _compose(previous: dict | None, layer: int, key: str, kept: list[int]) -> list[int]:
    """Indices into the original model, through an earlier compaction if there was one."""
    if previous is None:
        return kept
    earlier = previous["layers"][layer][key]
    return [earlier[i] for i in kept]


def compact(model: nn.Module) -> dict:
    """Remove masked structures physically, drop the gates, and return the pruning plan.

    The plan (`model.rku_pruning_plan`) lists per layer the kept original indices of MLP channels,
    query heads and KV groups. When every layer has the same shape, the config is updated so that
    `AutoModelForCausalLM.from_pretrained` can load a saved copy directly.
    """
    model = unwrap_model(model)
    gates = getattr(model, "rku_gates", None)
    if gates is None:
        raise ValueError("compact: the model has no pruning masks; run StructuredPruner(model).prune(...) first")
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise ValueError("compact: the model still has LoRA adapters; merge them first (peft merge_and_unload)")
    family = get_family(model)
    config = model.config
    previous = getattr(model, "rku_pruning_plan", None)
    original = (previous or {}).get("original") or {
        "num_hidden_layers": config.num_hidden_layers,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": family.layer_view(0).head_dim,
    }
    layers = []
    with torch.no_grad():
        for view in family.views():
            channels = torch.nonzero(gates.mlp[view.index].cpu() > 0).flatten()
            heads = torch.nonzero(gates.heads[view.index].cpu() > 0).flatten()
            groups = torch.nonzero((gates.heads[view.index].cpu() > 0).view(view.num_groups, -1).any(1)).flatten()
            layers.append(
                {
                    "mlp_channels": _compose(previous, view.index, "mlp_channels", channels.tolist()),
                    "heads": _compose(previous, view.index, "heads", heads.tolist()),
                    "kv_groups": _compose(previous, view.index, "kv_groups", groups.tolist()),
                }
            )
            keep_layer(family, view, channels, heads, groups)
    gates.detach()
    del model.rku_gates
    plan = {**gates.info, "original": original, "layers": layers}
    plan["uniform_shapes"] = layer_shapes_uniform(plan)
    _set_uniform_config(model, family, plan)
    model.rku_pruning_plan = plan
    return plan


def _set_uniform_config(model: nn.Module, family: ModelFamily, plan: dict) -> None:
    """When every layer has the same shape, the config says so, so a saved copy loads with `from_pretrained`."""
    if plan["uniform_shapes"]:
        first = plan["layers"][0]
        model.config.update(
            family.uniform_config_update(
                len(first["mlp_channels"]), len(first["heads"]), len(first["kv_groups"]), plan["original"]["head_dim"]
            )
        )
