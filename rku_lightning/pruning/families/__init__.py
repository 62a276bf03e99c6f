"""Model families: one `ModelFamily` per module layout, registered by `config.model_type`; `get_family` picks it."""

from .base import LayerView, ModelFamily, base_linear, unwrap_model
from .llama import LlamaFamily
from .qwen2 import Qwen2Family
from .registry import FAMILIES, get_family, register_family, supported_families

__all__ = [
    "FAMILIES",
    "LayerView",
    "LlamaFamily",
    "ModelFamily",
    "Qwen2Family",
    "base_linear",
    "get_family",
    "register_family",
    "supported_families",
    "unwrap_model",
]
