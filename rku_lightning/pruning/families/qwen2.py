"""Qwen2 layout: Llama's module names, with q/k/v biases (sliced with their rows) and no o_proj bias."""

from __future__ import annotations

from .llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    """Shares Llama's module tree (biases are found and sliced generically); its own family for Qwen2-only needs."""

    architectures = ("Qwen2ForCausalLM",)
    gguf_arch = "qwen2"  # its llama.cpp graph adds the q/k/v biases and rotates NEOX-style, like transformers
