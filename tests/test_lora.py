"""LoRA injection, merge-and-reinit (function preserved, also under pruning masks), NaN guard, removal."""

import pytest
import torch
from conftest import tiny_batches, tiny_model

from rku_lightning import StructuredPruner, compact
from rku_lightning.training.lora import (
    LoRASettings,
    has_lora,
    inject_lora,
    lora_layers,
    lora_parameters,
    merge_and_reinit_,
    remove_lora_,
    reset_optimizer_state_,
)

SETTINGS = dict(r=4, alpha=8, dropout=0.0)


def trained_lora_model(family: str, seed: int = 0):
    """A tiny model whose adapters hold non-zero deltas, as after some recovery steps."""
    model = tiny_model(family, seed)
    inject_lora(model, SETTINGS)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.1)
    return model.eval()


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_inject_freezes_base_and_trains_adapters_only(family):
    model = tiny_model(family)
    params = inject_lora(model, SETTINGS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params} == {id(p) for p in lora_parameters(model)}
    assert len(lora_layers(model)) == 7 * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, SETTINGS)


def test_adapters_stay_fp32_on_a_bf16_model():
    model = tiny_model("llama").to(torch.bfloat16)
    params = inject_lora(model, SETTINGS)
    assert all(p.dtype == torch.float32 for p in params)
    assert model.model.layers[0].mlp.down_proj.base_layer.weight.dtype == torch.bfloat16


def test_merge_preserves_the_function(family):
    model = trained_lora_model(family)
    batch = tiny_batches(1)[0]
    before = logits(model, batch)
    assert merge_and_reinit_(model, seed=3) == len(lora_layers(model))
    after = logits(model, batch)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert all(bool((layer.lora_B["default"].weight == 0).all()) for layer in lora_layers(model))


def test_merge_preserves_the_function_under_masks(family):
    model = trained_lora_model(family)
    batches = tiny_batches(2)
    pruner = StructuredPruner(model, importance="magnitude", progress=False)
    pruner.prune(0.3)
    before = logits(model, batches[0])
    merge_and_reinit_(model, seed=0)
    torch.testing.assert_close(logits(model, batches[0]), before, atol=1e-5, rtol=1e-5)
    # After removal and compaction the physically smaller model still computes the same function.
    remove_lora_(model)
    assert not has_lora(model)
    compact(model)
    torch.testing.assert_close(logits(model, batches[0]), before, atol=1e-4, rtol=1e-4)


def test_reinit_is_seeded():
    a, b = trained_lora_model("llama"), trained_lora_model("llama")
    merge_and_reinit_(a, seed=7)
    merge_and_reinit_(b, seed=7)
    for pa, pb in zip(lora_parameters(a), lora_parameters(b)):
        assert torch.equal(pa, pb)
    c = trained_lora_model("llama")
    merge_and_reinit_(c, seed=8)
    assert not torch.equal(lora_parameters(a)[0], lora_parameters(c)[0])


def test_non_finite_delta_fails_and_changes_nothing():
    model = trained_lora_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        lora_layers(model)[5].lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        merge_and_reinit_(model, seed=0)
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name


def test_reset_optimizer_state_drops_adapter_moments():
    model = trained_lora_model("llama")
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch = tiny_batches(1)[0]
    model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    assert all(p in optimizer.state for p in params)
    reset_optimizer_state_([optimizer], params[:2])
    assert params[0] not in optimizer.state and params[1] not in optimizer.state and params[2] in optimizer.state


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(rank=4), "unknown keys"),
        (dict(r=0), "lora.r"),
        (dict(alpha=-1), "lora.alpha"),
        (dict(dropout=1.0), "lora.dropout"),
        (dict(target_modules=[]), "lora.target_modules"),
    ],
)
def test_bad_settings_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        LoRASettings.from_mapping(values)
