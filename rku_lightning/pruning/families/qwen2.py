"""Qwen2 layout: Llama's module names, with q/k/v biases (sliced with their rows) and no o_proj bias."""

from __future__ import annotations

from .llama import LlamaFamily
from .registry import register_family


@register_family
class Qwen2Family(LlamaFamily):
    """Shares Llama's module tree (biases are found and sliced generically); its own family for Qwen2-only needs."""

    model_types = ("qwen2",)
    gguf_arch = "qwen2"  # its llama.cpp graph adds the q/k/v biases and rotates NEOX-style, like transformers
