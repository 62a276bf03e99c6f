"""The contract every registered model family keeps, run on a tiny random model of each one.

A family that is registered without a tiny fixture in conftest fails here instead of going untested.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CLASSES, tiny_batches, tiny_config, tiny_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaModel

from rku_lightning import StructuredPruner, compact, load_pruned, save_pruned
from rku_lightning.pruning.families import FAMILIES, LlamaFamily, ModelFamily, base_linear, get_family, register_family


@pytest.fixture(params=sorted(FAMILIES))
def model_type(request) -> str:
    return request.param


def test_every_registered_family_has_a_tiny_model():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2"}
    assert set(FAMILIES) <= set(TINY_CLASSES)


def test_views_resolve_to_modules_of_their_layer(model_type):
    model = tiny_model(model_type)
    family = get_family(model)
    assert type(family) is FAMILIES[model_type] and isinstance(family, ModelFamily)
    views = family.views()
    assert [v.index for v in views] == list(range(model.config.num_hidden_layers))
    for view, layer in zip(views, family.decoder_layers()):
        assert view.layer is layer
        inside = {id(m) for m in layer.modules()}
        projections = (*view.mlp_rows, view.mlp_out, view.q, *view.kv_rows, view.o)
        assert all(id(m) in inside for m in (view.mlp, view.attention, *projections))
        assert all(isinstance(base_linear(m), nn.Linear) for m in projections)
    names = family.projection_names()
    assert len(set(names)) == len(views[0].mlp_rows) + len(views[0].kv_rows) + 3
    assert all(any(n.endswith("." + name) for n, _ in views[0].layer.named_modules()) for name in names)


def test_counts_agree_with_the_config_and_the_weights(model_type):
    model = tiny_model(model_type)
    config, family = model.config, get_family(model)
    hidden = config.hidden_size
    for view in family.views():
        assert (view.num_channels, view.num_heads, view.num_groups) == (
            config.intermediate_size, config.num_attention_heads, config.num_key_value_heads
        )
        assert view.heads_per_group * view.num_groups == view.num_heads
        assert all(base_linear(m).weight.shape == (view.num_channels, hidden) for m in view.mlp_rows)
        assert base_linear(view.mlp_out).weight.shape == (hidden, view.num_channels)
        assert base_linear(view.q).weight.shape == (view.num_heads * view.head_dim, hidden)
        assert base_linear(view.o).weight.shape == (hidden, view.num_heads * view.head_dim)
        assert all(base_linear(m).weight.shape == (view.num_groups * view.head_dim, hidden) for m in view.kv_rows)
    batch = tiny_batches(1)[0]
    with torch.no_grad():
        hidden_states = family.decoder()(**batch).last_hidden_state
    assert hidden_states.shape == (*batch["input_ids"].shape, hidden)
    assert any(m is family.final_norm() for m in family.decoder().modules())


def test_unpruned_compaction_keeps_the_logits(model_type):
    model = tiny_model(model_type)
    batch = tiny_batches(1, seed=3)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    StructuredPruner(model, importance="magnitude", progress=False)
    plan = compact(model)
    assert plan["uniform_shapes"] and len(plan["layers"][0]["mlp_channels"]) == model.config.intermediate_size
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected)


@pytest.mark.parametrize("attention", ["groups", "query_heads"])
def test_prune_compact_forward_generate_and_reload(model_type, attention, tmp_path):
    model = tiny_model(model_type)
    batch = tiny_batches(1, seed=4)[0]
    # Global allocation: per-layer shapes, the harder case for compaction and reload.
    pruner = StructuredPruner(model, importance="magnitude", allocation="global", attention=attention, progress=False)
    report = pruner.prune(0.3)
    assert report.sparsity == pytest.approx(0.3, abs=0.02)
    with torch.no_grad():
        masked = model(**batch).logits
    compact(model)
    assert sum(p.numel() for p in model.parameters()) == report.total_params_after
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=1e-5)
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 2
    loaded, _ = load_pruned(save_pruned(model, None, tmp_path / "export"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, masked, atol=1e-5, rtol=1e-5)


def test_an_unregistered_model_type_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(NotImplementedError, match="'gpt2'.*llama \\(LlamaForCausalLM\\), mistral .*qwen2"):
        get_family(gpt2)


def test_a_model_without_lm_head_is_refused_by_name():
    with pytest.raises(NotImplementedError, match="LlamaModel has no LM head.*LlamaForCausalLM"):
        get_family(LlamaModel(tiny_config("llama")))


def test_registering_a_served_model_type_or_an_abstract_family_is_an_error():
    class AnotherLlama(LlamaFamily):
        model_types = ("mistral",)

    with pytest.raises(ValueError, match="'mistral' of AnotherLlama is already served by LlamaFamily"):
        register_family(AnotherLlama)
    assert FAMILIES["mistral"] is LlamaFamily

    class NoViews(ModelFamily):
        model_types = ("gpt2",)

    with pytest.raises(TypeError, match="concrete ModelFamily"):
        register_family(NoViews)
    with pytest.raises(TypeError, match="abstract"):
        NoViews(tiny_model("llama"))
    assert "gpt2" not in FAMILIES
