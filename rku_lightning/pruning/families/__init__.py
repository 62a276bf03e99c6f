"""One adapter per model family; `get_adapter` picks it from the model's class."""

from __future__ import annotations

from transformers import PreTrainedModel

from .base import LayerView, ModelAdapter, base_linear
from .llama import LlamaAdapter
from .qwen2 import Qwen2Adapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, Qwen2Adapter)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for cls in ADAPTERS for a in cls.architectures)


def unwrap_model(model) -> PreTrainedModel:
    """The Hugging Face model inside a peft `PeftModel` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_adapter(model) -> ModelAdapter:
    model = unwrap_model(model)
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.architectures:
            return cls(model)
    raise NotImplementedError(
        f"{name} is not supported for structural pruning; supported families: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


__all__ = ["LayerView", "ModelAdapter", "base_linear", "get_adapter", "unwrap_model", "SUPPORTED_ARCHITECTURES"]
