"""Llama layout (also Mistral): gated MLP (gate/up/down) and GQA attention (q/k/v/o), optional biases."""

from __future__ import annotations

from .base import LayerView, ModelFamily
from .registry import register_family


@register_family
class LlamaFamily(ModelFamily):
    model_types = ("llama", "mistral")
    gguf_arch = "llama"

    def layer_view(self, index: int) -> LayerView:
        layer = self.decoder_layers()[index]
        mlp, attn = layer.mlp, layer.self_attn
        return LayerView(
            index=index,
            layer=layer,
            mlp=mlp,
            attention=attn,
            mlp_rows=(mlp.gate_proj, mlp.up_proj),
            mlp_out=mlp.down_proj,
            q=attn.q_proj,
            kv_rows=(attn.k_proj, attn.v_proj),
            o=attn.o_proj,
            head_dim=attn.head_dim,
        )
