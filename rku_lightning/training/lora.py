"""LoRA adapters for recovery between pruning rounds: inject, merge into the base weights, re-initialise.

Adapters are injected in place with peft (`inject_adapter_in_model`), so the Hugging Face model keeps
its module tree and the pruning gates, hooked on whatever module sits at each projection, gate the
LoRA branch together with the base layer. After a round of recovery `merge_and_reinit_` folds the
deltas into the base weights and restarts the adapters from B = 0, so the model's function does not
change and the next round scores (and recovers) the recovered model. Re-initialisation draws from a
generator seeded by the caller, which keeps DDP ranks identical and a resumed run equal to an
uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import cast_adapter_dtype
from torch import nn

from rku_lightning.checks import fraction, positive_int
from rku_lightning.pruning.families import get_family, unwrap_model

ADAPTER = "default"


@dataclass(frozen=True)
class LoRASettings:
    """LoRA hyper-parameters; `from_mapping` validates a user's dict and names the bad key."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    #: None: every prunable projection, as the model family names them.
    target_modules: tuple[str, ...] | None = None

    @classmethod
    def from_mapping(cls, values: Mapping | None, field_name: str = "lora") -> "LoRASettings":
        values = dict(values or {})
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"{field_name}: unknown keys {unknown}; allowed keys are {sorted(allowed)}")
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        settings = cls(**values)
        positive_int(f"{field_name}.r", settings.r)
        if not isinstance(settings.alpha, (int, float)) or not settings.alpha > 0:
            raise ValueError(f"{field_name}.alpha must be a positive number, got {settings.alpha!r}")
        fraction(f"{field_name}.dropout", settings.dropout)
        targets = settings.target_modules
        if targets is not None and (not targets or not all(isinstance(t, str) for t in targets)):
            raise ValueError(f"{field_name}.target_modules must be a non-empty list of module names")
        return settings


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in unwrap_model(model).modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter weights (A and B of every LoRA layer), in module order."""
    params: list[nn.Parameter] = []
    for layer in lora_layers(model):
        for adapter in layer.lora_A:
            params += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    return params


def inject_lora(model: nn.Module, settings: LoRASettings | Mapping | None = None) -> list[nn.Parameter]:
    """Inject LoRA adapters in place, freeze everything else, keep adapters in fp32; returns their parameters.

    fp32 adapters on a bf16/fp16 base keep small updates from rounding away and make merges exact to
    the base dtype's precision.
    """
    if not isinstance(settings, LoRASettings):
        settings = LoRASettings.from_mapping(settings)
    hf_model = unwrap_model(model)
    if has_lora(hf_model):
        raise ValueError("inject_lora: the model already has LoRA adapters")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules or get_family(hf_model).projection_names()),
        bias="none",
    )
    inject_adapter_in_model(config, hf_model, adapter_name=ADAPTER)
    cast_adapter_dtype(hf_model, adapter_name=ADAPTER, autocast_adapter_dtype=True)
    for param in hf_model.parameters():
        param.requires_grad_(False)
    params = lora_parameters(hf_model)
    for param in params:
        param.requires_grad_(True)
    return params


def _reinit_(layer: LoraLayer, adapter: str, generator: torch.Generator) -> None:
    """peft's default init (A Kaiming-uniform, B zero), drawn on CPU from `generator` for every device alike."""
    a = layer.lora_A[adapter].weight
    fresh = torch.empty(a.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
    with torch.no_grad():
        a.copy_(fresh.to(device=a.device, dtype=a.dtype))
        layer.lora_B[adapter].weight.zero_()


def reinit_lora_(model: nn.Module, seed: int) -> None:
    """Re-initialise every adapter from `seed` (B = 0, so the model's output is unchanged)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model):
        for adapter in layer.lora_A:
            _reinit_(layer, adapter, generator)


@torch.no_grad()
def merge_and_reinit_(model: nn.Module, seed: int) -> int:
    """Fold every LoRA delta into its base weight and re-initialise the adapter; returns the layer count.

    All deltas are computed and checked before any weight changes: a non-finite delta (diverged
    recovery, fp16 overflow) raises FloatingPointError and leaves the model as it was.
    """
    layers = lora_layers(model)
    deltas = []
    for layer in layers:
        for adapter in layer.lora_A:
            if layer.merged:
                raise RuntimeError("merge_and_reinit_: a LoRA layer is in peft's merged state; unmerge it first")
            delta = layer.get_delta_weight(adapter).float()
            if not bool(torch.isfinite(delta).all()):
                name = next(n for n, m in unwrap_model(model).named_modules() if m is layer)
                raise FloatingPointError(f"LoRA delta of {name} is not finite; recovery diverged, nothing was merged")
            deltas.append((layer, delta))
    for layer, delta in deltas:
        weight = layer.get_base_layer().weight
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    reinit_lora_(model, seed)
    return len(deltas)


def remove_lora_(model: nn.Module) -> None:
    """Merge what is left in the adapters and put the plain base layers back (compaction needs them)."""
    hf_model = unwrap_model(model)
    merge_and_reinit_(hf_model, seed=0)
    for name, module in list(hf_model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
            setattr(parent, child, module.get_base_layer())


def reset_optimizer_state_(optimizers: Iterable[torch.optim.Optimizer], params: Iterable[nn.Parameter]) -> None:
    """Drop the optimizer state (Adam moments, step counts) of `params`: re-initialised adapters start fresh."""
    params = list(params)
    for optimizer in optimizers:
        for param in params:
            optimizer.state.pop(param, None)
