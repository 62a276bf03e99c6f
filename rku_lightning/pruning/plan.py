"""`pruning.json`: what an export records about its pruning, and the checks it must pass on load.

A plan lists per decoder layer the kept *original* indices of MLP channels, query heads and KV
groups, next to the dense model's counts (`original`). Loading slices a dense model by it, so a
plan that disagrees with itself, with `config.json` or with the weights would build a wrong model
or fail deep inside torch; every check here names the layer and field that disagree instead.

The kept indices only matter for re-pruning and reports (the weights alone decide the outputs), so an
edit that keeps every count would load silently; `save_pruned` therefore records a digest of the
layer lists (`layers_sha256`), which `validate_plan` checks when present.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
from transformers import PretrainedConfig

PLAN_FILE = "pruning.json"
#: Per-layer field of the plan -> the `original` (and config) count it indexes into.
LAYER_FIELDS: dict[str, str] = {
    "mlp_channels": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_groups": "num_key_value_heads",
}
ORIGINAL_FIELDS: tuple[str, ...] = ("num_hidden_layers", *LAYER_FIELDS.values(), "head_dim")
_FIX = "the file was edited or belongs to other weights; re-export the model with save_pruned"


class PlanError(ValueError):
    """A `pruning.json` that does not describe the weights beside it."""


def layers_digest(layers: list) -> str:
    """sha256 of the layer lists in a canonical JSON form."""
    return hashlib.sha256(json.dumps(layers, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def layer_shapes_uniform(plan: Mapping) -> bool:
    """Whether every layer keeps the same counts (then the export loads with plain `from_pretrained`)."""
    shapes = {tuple(len(layer[k]) for k in LAYER_FIELDS) for layer in plan["layers"]}
    return len(shapes) == 1


def _fail(source: str, where: str, message: str) -> PlanError:
    return PlanError(f"{source}: {where}: {message}; {_FIX}")


def _check_original(plan: Mapping, source: str) -> dict[str, int]:
    original = plan.get("original")
    if not isinstance(original, Mapping):
        raise _fail(source, "field 'original'", "missing or not an object with the dense model's counts")
    for key in ORIGINAL_FIELDS:
        value = original.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(source, f"original.{key}", f"must be a positive integer, got {value!r}")
    if original["num_attention_heads"] % original["num_key_value_heads"]:
        raise _fail(source, "original.num_attention_heads", "is not a multiple of original.num_key_value_heads")
    return dict(original)


def _check_indices(source: str, index: int, field: str, kept: object, total: int) -> list[int]:
    where = f"layer {index} field '{field}'"
    if not isinstance(kept, list) or not kept or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        raise _fail(source, where, f"must be a non-empty list of integers, got {kept!r:.80}")
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise _fail(source, where, "indices must be strictly increasing (sorted, no repeats)")
    if kept[0] < 0 or kept[-1] >= total:
        bad = kept[0] if kept[0] < 0 else kept[-1]
        raise _fail(source, where, f"index {bad} is outside [0, {total}) (original.{LAYER_FIELDS[field]} = {total})")
    return kept


def validate_plan(plan: object, source: str) -> None:
    """Raise `PlanError` unless `plan` is self-consistent: counts, index ranges, GQA grouping, shape flag."""
    if not isinstance(plan, Mapping):
        raise _fail(source, "top level", "must be a JSON object")
    original = _check_original(plan, source)
    layers = plan.get("layers")
    if not isinstance(layers, list) or len(layers) != original["num_hidden_layers"]:
        count = len(layers) if isinstance(layers, list) else layers
        raise _fail(source, "field 'layers'", f"has {count} entries, original.num_hidden_layers is {original['num_hidden_layers']}")
    per_group = original["num_attention_heads"] // original["num_key_value_heads"]
    for index, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise _fail(source, f"layer {index}", "must be an object with mlp_channels, heads and kv_groups")
        kept = {f: _check_indices(source, index, f, layer.get(f), original[c]) for f, c in LAYER_FIELDS.items()}
        groups = set(kept["kv_groups"])
        outside = [h for h in kept["heads"] if h // per_group not in groups]
        if outside:
            raise _fail(source, f"layer {index} field 'heads'", f"head {outside[0]} belongs to KV group "
                        f"{outside[0] // per_group}, which 'kv_groups' {sorted(groups)} does not keep")
        counts = {g: sum(h // per_group == g for h in kept["heads"]) for g in groups}
        if len(set(counts.values())) != 1:
            raise _fail(source, f"layer {index} field 'heads'", f"kept KV groups keep different numbers of query "
                        f"heads {counts}; every group must keep the same number")
    flag = plan.get("uniform_shapes")
    if flag is not layer_shapes_uniform(plan):
        raise _fail(source, "field 'uniform_shapes'", f"is {flag!r} but the layers' kept counts say {layer_shapes_uniform(plan)}")
    if "layers_sha256" in plan and plan["layers_sha256"] != layers_digest(layers):
        raise _fail(source, "field 'layers'", "the kept indices were edited (their digest 'layers_sha256' no longer matches)")


def validate_config(plan: Mapping, config: PretrainedConfig, source: str) -> None:
    """The config must hold the pruned counts (uniform export) or the dense ones (per-layer export)."""
    if config.num_hidden_layers != plan["original"]["num_hidden_layers"]:
        raise _fail(source, "config.json num_hidden_layers",
                    f"is {config.num_hidden_layers}, pruning.json original.num_hidden_layers is {plan['original']['num_hidden_layers']}")
    first = plan["layers"][0]
    for field, key in LAYER_FIELDS.items():
        expected = len(first[field]) if plan["uniform_shapes"] else plan["original"][key]
        what = f"layer 0 field '{field}' keeps {expected}" if plan["uniform_shapes"] else f"original.{key} is {expected}"
        if getattr(config, key) != expected:
            raise _fail(source, f"config.json {key}", f"is {getattr(config, key)} but pruning.json {what}")


def validate_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], fields: Mapping[str, tuple[int, str]],
                     source: str) -> None:
    """Every saved tensor must have the shape the plan gave its module; `fields` maps module names to (layer, field)."""
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected or tuple(tensor.shape) == tuple(expected[name].shape):
            continue
        module = name.rsplit(".", 1)[0]
        if module in fields:
            layer, field = fields[module]
            where = f"layer {layer} field '{field}'"
        else:
            where = f"weight {name}"
        raise _fail(source, where, f"the safetensors hold {name} with shape {tuple(tensor.shape)}, "
                    f"the plan makes it {tuple(expected[name].shape)}")
