"""Read and check `pruning.json`: an edited or damaged plan must fail with the layer and field at fault.

The kept indices only matter for re-pruning and reports (the weights alone decide the outputs), so an
edit that keeps every count would load silently; `save_pruned` therefore records a digest of the
layer lists (`layers_sha256`), which is checked here when present.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

PLAN_FILE = "pruning.json"
_ORIGINAL_KEYS = ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
# field of a layer entry -> the `original` count its indices range over
_LAYER_FIELDS = {"mlp_channels": "intermediate_size", "heads": "num_attention_heads", "kv_groups": "num_key_value_heads"}


def layers_digest(layers: list[dict]) -> str:
    """sha256 of the layer lists in a canonical JSON form."""
    return hashlib.sha256(json.dumps(layers, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fail(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; the file does not match the export it came with: re-export the model or restore the file")


def _check_layer(path: Path, i: int, layer: object, original: dict) -> None:
    if not isinstance(layer, dict):
        raise _fail(path, f"layers[{i}] is {type(layer).__name__}, expected an object with {sorted(_LAYER_FIELDS)}")
    for field, limit_key in _LAYER_FIELDS.items():
        values = layer.get(field)
        if not isinstance(values, list) or not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise _fail(path, f"layer {i} field {field!r} must be a non-empty list of integers, got {values!r:.80}")
        limit = original[limit_key]
        if values[0] < 0 or values[-1] >= limit or any(b <= a for a, b in zip(values, values[1:])):
            raise _fail(path, f"layer {i} field {field!r} must hold increasing indices in [0, {limit}) ({limit_key})")
    heads, groups = layer["heads"], layer["kv_groups"]
    per_group = original["num_attention_heads"] // original["num_key_value_heads"]
    owners = [h // per_group for h in heads]
    if sorted(set(owners)) != groups or len(heads) % len(groups) or any(owners.count(g) != len(heads) // len(groups) for g in groups):
        raise _fail(path, f"layer {i}: 'heads' {heads} do not keep the same number of heads in each of 'kv_groups' {groups}")


def read_plan(folder: Path) -> dict:
    """The checked plan of an export folder: JSON, keys, counts, index ranges and the layer digest."""
    path = folder / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {PLAN_FILE}; it was not written by save_pruned")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise _fail(path, f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    if not isinstance(plan, dict):
        raise _fail(path, "expected a JSON object")
    original, layers = plan.get("original"), plan.get("layers")
    if not isinstance(original, dict) or any(not isinstance(original.get(k), int) or original[k] < 1 for k in _ORIGINAL_KEYS):
        raise _fail(path, f"field 'original' must hold positive integers {list(_ORIGINAL_KEYS)}")
    if not isinstance(layers, list) or len(layers) != original["num_hidden_layers"]:
        raise _fail(path, f"field 'layers' must list {original['num_hidden_layers']} layers (original.num_hidden_layers)")
    for i, layer in enumerate(layers):
        _check_layer(path, i, layer, original)
    shapes = {tuple(len(layer[f]) for f in _LAYER_FIELDS) for layer in layers}
    if plan.get("uniform_shapes") is not (len(shapes) == 1):
        raise _fail(path, f"field 'uniform_shapes' is {plan.get('uniform_shapes')!r} but the layers have {len(shapes)} shape(s)")
    if "layers_sha256" in plan and plan["layers_sha256"] != layers_digest(layers):
        raise _fail(path, "the kept indices in 'layers' were edited (their digest 'layers_sha256' no longer matches)")
    return plan


def check_config_counts(folder: Path, plan: dict, config) -> None:
    """A uniform export's config must give every layer the plan's counts."""
    first = plan["layers"][0]
    for field, key in (("mlp_channels", "intermediate_size"), ("heads", "num_attention_heads"), ("kv_groups", "num_key_value_heads")):
        if len(first[field]) != getattr(config, key):
            raise _fail(folder / PLAN_FILE, f"every layer keeps {len(first[field])} {field} but config.json has {key}={getattr(config, key)}")


def check_weight_shapes(folder: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The saved tensors must have the shapes the plan gave the rebuilt model."""
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            layer = re.search(r"layers\.(\d+)\.", key)
            where = f"layer {layer[1]}: " if layer else ""
            raise _fail(
                folder / PLAN_FILE,
                f"{where}{key} is {tuple(tensor.shape)} in the weights but {tuple(expected[key].shape)} by the plan's counts",
            )
