"""What a model family must tell the engine: where the prunable groups of each decoder layer live.

A model family (Llama, Qwen2, ...) is not a LoRA adapter: "adapter" in this project always means LoRA.

Everything else (scoring, allocation, compaction, export) is written once against `LayerView`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside a peft `PeftModel` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain `nn.Linear` inside a module, looking through a peft LoRA wrapper."""
    inner = getattr(module, "base_layer", module)
    if not isinstance(inner, nn.Linear):
        raise TypeError(f"expected an nn.Linear (or a LoRA wrapper of one), got {type(module).__name__}")
    return inner


@dataclass(frozen=True)
class LayerView:
    """The modules of one decoder layer that form prunable groups.

    - MLP channel j: row j of each of `mlp_rows`, column j of `mlp_out`.
    - Query head h: rows [h*d, (h+1)*d) of `q`, the same columns of `o`.
    - KV group g: rows [g*d, (g+1)*d) of each of `kv_rows`, with the query heads that share it.
    Modules are resolved when the view is made, so a LoRA wrapper is returned where peft put one.
    """

    index: int
    layer: nn.Module
    mlp: nn.Module
    attention: nn.Module
    mlp_rows: tuple[nn.Module, ...]
    mlp_out: nn.Module
    q: nn.Module
    kv_rows: tuple[nn.Module, ...]
    o: nn.Module
    head_dim: int

    @property
    def num_channels(self) -> int:
        return base_linear(self.mlp_out).in_features

    @property
    def num_heads(self) -> int:
        return base_linear(self.q).out_features // self.head_dim

    @property
    def num_groups(self) -> int:
        return base_linear(self.kv_rows[0]).out_features // self.head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups


class ModelFamily(ABC):
    """Maps one model family's module tree onto `LayerView`s: subclass, implement `layer_view`, and
    list the `config.model_type` values it serves; `register_family` then makes `get_family` pick it.

    The defaults below fit the Hugging Face decoder layout (`model.model.layers`, `model.model.norm`);
    a family overrides only what differs.
    """

    #: `config.model_type` values this family serves.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: llama.cpp architecture of a GGUF export whose layers all have the same shape (None: no GGUF export).
    gguf_arch: ClassVar[str | None] = None
    #: Which rows of a head RoPE rotates together in this family's checkpoints: "neox" = the two halves
    #: (transformers' rotate_half), "norm" = adjacent pairs. GGUF export permutes Q/K when llama.cpp differs.
    rope_layout: ClassVar[str] = "neox"

    def __init__(self, model: PreTrainedModel):
        self.model = model

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def decoder(self) -> nn.Module:
        """The transformer without its LM head (returns hidden states)."""
        return self.model.model

    def final_norm(self) -> nn.Module:
        return self.decoder().norm

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.decoder().layers)

    @abstractmethod
    def layer_view(self, index: int) -> LayerView:
        """The prunable modules of decoder layer `index`."""

    def views(self) -> list[LayerView]:
        return [self.layer_view(i) for i in range(len(self.decoder_layers()))]

    def projection_names(self) -> tuple[str, ...]:
        """Leaf names of every prunable projection (what LoRA recovery targets), read off layer 0."""
        view = self.layer_view(0)
        wanted = {id(m) for m in (*view.mlp_rows, view.mlp_out, view.q, *view.kv_rows, view.o)}
        return tuple(name.rsplit(".", 1)[-1] for name, m in view.layer.named_modules() if id(m) in wanted)

    def set_attention_shape(self, view: LayerView, num_heads: int, num_groups: int) -> None:
        """Update the attention module's own bookkeeping after its projections were sliced."""
        view.attention.num_key_value_groups = num_heads // num_groups

    def uniform_config_update(self, intermediate_size: int, num_heads: int, num_groups: int, head_dim: int) -> dict:
        """Config fields that make a uniformly pruned model load with plain `from_pretrained`."""
        return {
            "intermediate_size": intermediate_size,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_groups,
            "head_dim": head_dim,
        }
