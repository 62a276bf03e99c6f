"""StructuredPruner on tiny random Llama / Qwen2 models: budgets, scoring math, iterative rounds, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_batches, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from rku_lightning import StructuredPruner
from rku_lightning.pruning.allocation import LayerOffer, Step, fill_pool
from rku_lightning.pruning.importance import IMPORTANCES

METHODS = sorted(IMPORTANCES)


def calibrated(family: str, importance: str = "rku", **kwargs) -> tuple[torch.nn.Module, StructuredPruner]:
    model = tiny_model(family)
    pruner = StructuredPruner(model, importance=importance, progress=False, **kwargs)
    pruner.calibrate(tiny_batches())
    return model, pruner


@pytest.mark.parametrize("importance", METHODS)
@pytest.mark.parametrize("allocation", ["global", "uniform", "joint"])
@pytest.mark.parametrize("attention", ["groups", "query_heads"])
def test_budget_is_met(family, importance, allocation, attention):
    _, pruner = calibrated(family, importance, allocation=allocation, attention=attention)
    report = pruner.prune(0.35)
    # Tiny layers make steps coarse (one MLP channel is ~1% here); real models land far closer.
    assert abs(report.sparsity - 0.35) < 0.012
    assert report.decoder_params_after < report.decoder_params_before
    assert 0 < report.total_sparsity < report.sparsity
    if allocation == "uniform":
        shapes = {(r.mlp_channels, r.heads, r.kv_groups) for r in report.layers}
        assert len(shapes) == 1


def test_iterative_pruning_never_revives(family):
    model, pruner = calibrated(family)
    first = pruner.prune(0.2)
    dead_mlp = [m == 0 for m in pruner.gates.mlp]
    dead_heads = [m == 0 for m in pruner.gates.heads]
    pruner.reset()
    pruner.calibrate(tiny_batches(seed=3))
    second = pruner.prune(0.4)
    assert second.sparsity > first.sparsity
    for before, now in zip(dead_mlp + dead_heads, pruner.gates.mlp + pruner.gates.heads):
        assert bool((now[before] == 0).all())
    with pytest.raises(ValueError, match="never revives"):
        pruner.prune(0.1)


def test_min_keep_rules_hold_at_the_limit(family):
    _, pruner = calibrated(family, min_mlp_keep=0.25)
    limit = pruner.max_sparsity()
    report = pruner.prune(math.floor(limit * 1000) / 1000)
    for layer in report.layers:
        assert layer.mlp_channels >= math.ceil(0.25 * layer.mlp_channels_total)
        assert layer.kv_groups >= 1
    with pytest.raises(ValueError, match="unreachable.*min_mlp_keep"):
        calibrated(family, min_mlp_keep=0.25)[1].prune(min(0.99, limit + 0.05))


def test_query_head_mode_keeps_equal_ratio_and_every_group(family):
    _, pruner = calibrated(family, attention="query_heads")
    pruner.prune(0.6)
    for heads in pruner.gates.heads:
        per_group = heads.view(2, 3).sum(1)
        assert per_group[0] == per_group[1] >= 1


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_attention_none_prunes_mlp_channels_only(family, allocation):
    _, pruner = calibrated(family, allocation=allocation, attention="none")
    report = pruner.prune(0.35)
    assert abs(report.sparsity - 0.35) < 0.012
    assert all(bool((heads > 0).all()) for heads in pruner.gates.heads)
    assert all(r.heads == r.heads_total and r.mlp_channels < r.mlp_channels_total for r in report.layers)


def _offers(attention_score: float) -> list[LayerOffer]:
    """Two layers of 10 unit-cost channels (score 1) and 2 attention groups of cost 5 (one may go)."""
    return [
        LayerOffer(
            layer, [Step(1.0, 1.0, layer, channels=(j,)) for j in range(10)], 9,
            [Step(attention_score, 5.0, layer, heads=(g,)) for g in range(2)], 1, 1.0, 5.0, 20.0, 10.0, 0.0, 0.0,
        )
        for layer in range(2)
    ]


@pytest.mark.parametrize(("attention_score", "groups_joint"), [(0.1, 2), (100.0, 0)])
def test_joint_allocation_lets_scores_per_parameter_decide_the_split(attention_score, groups_joint):
    # `global` gives attention its proportional share (10 of 40 removable -> one group) whatever the scores say.
    fixed = fill_pool(_offers(attention_score), 10.0)
    assert sum(len(h) for h in fixed.heads.values()) == 1 and fixed.removed_params == 10.0
    joint = fill_pool(_offers(attention_score), 10.0, joint=True)
    assert sum(len(h) for h in joint.heads.values()) == groups_joint and joint.removed_params == 10.0
    assert sum(len(c) for c in joint.channels.values()) == 10 - 5 * groups_joint


def test_plans_are_deterministic(family):
    masks = []
    for _ in range(2):
        _, pruner = calibrated(family)
        pruner.prune(0.3)
        masks.append(pruner.state_dict()["masks"])
    assert all(torch.equal(a, b) for a, b in zip(masks[0]["mlp"] + masks[0]["heads"], masks[1]["mlp"] + masks[1]["heads"]))


def test_gate_gradient_is_the_derivative_of_the_objective(family):
    """G_s(x) from the gates equals a finite difference of Phi in the gate of structure s."""
    model = tiny_model(family).double()  # float64, so that the finite difference is exact enough
    pruner = StructuredPruner(model, importance="taylor", progress=False)
    batch = tiny_batches(1, batch_size=1, pad=False)[0]
    pruner.calibrate([batch])
    grads = pruner.stats.gradients("mlp", 1).mean
    channel = int(grads.abs().argmax())

    pruner.gates.mlp[1] = pruner.gates.mlp[1].double()

    def phi(scale: float) -> float:
        pruner.gates.mlp[1][channel] = scale
        with torch.no_grad():
            value = float(pruner.objective(pruner.family, batch).sum())
        pruner.gates.mlp[1][channel] = 1.0
        return value

    eps = 1e-2  # rotary tables are float32 even in a float64 model: smaller steps drown in rounding
    numeric = (phi(1 + eps) - phi(1 - eps)) / (2 * eps)
    assert numeric == pytest.approx(float(grads[channel]), rel=2e-3)
    assert abs(numeric) > 1e-6


def test_rku_divides_kinetic_utility_by_the_block_fisher_trace(family):
    _, pruner = calibrated(family)
    view = pruner.family.layer_view(0)
    alive = torch.ones(view.num_channels, dtype=torch.bool)
    moments = pruner.stats.gradients("mlp", 0)
    expected = moments.abs_mean / torch.sqrt(moments.sq_mean.mean() + 1e-20)
    assert torch.allclose(pruner.importance.layer_scores(view, "mlp", pruner.stats, alive), expected)
    # Block-relative: scaling one block's gradients by c leaves its RKU scores unchanged.
    for key in ("grad.mlp.0.abs", "grad.mlp.0.sum"):
        pruner.stats.sums[key] *= 7.0
    pruner.stats.sums["grad.mlp.0.sq"] *= 49.0
    assert torch.allclose(pruner.importance.layer_scores(view, "mlp", pruner.stats, alive), expected)


def test_group_gradient_is_the_sum_of_its_heads(family):
    _, pruner = calibrated(family, importance="taylor")
    heads = pruner.stats.sums["grad.head.0.sum"]
    groups = pruner.stats.sums["grad.group.0.sum"]
    assert torch.allclose(heads.view(2, 3).sum(1), groups)


def test_scoring_leaves_weights_frozen_and_gradient_free(family):
    model = tiny_model(family)
    for p in model.parameters():
        p.requires_grad_(True)
    pruner = StructuredPruner(model, progress=False)
    pruner.calibrate(tiny_batches())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_calibrate_accumulates_until_reset_and_micro_batches_agree(family):
    model = tiny_model(family)
    whole = StructuredPruner(model, progress=False)
    whole.calibrate(tiny_batches(2, batch_size=4))
    assert whole.stats.num_samples() == 8
    split = StructuredPruner(tiny_model(family), progress=False, micro_batch_size=1)
    split.calibrate(tiny_batches(2, batch_size=4))
    for key, value in whole.stats.sums.items():
        assert torch.allclose(value, split.stats.sums[key], rtol=1e-5, atol=1e-8), key
    whole.calibrate(tiny_batches(1, batch_size=4))
    assert whole.stats.num_samples() == 12
    whole.reset()
    assert whole.stats.num_samples() == 0


def test_hidden_objective_needs_no_labels(family):
    model = tiny_model(family)
    pruner = StructuredPruner(model, objective="hidden", progress=False)
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in tiny_batches()]
    pruner.calibrate(batches)
    assert pruner.prune(0.3).sparsity > 0.29
    assert pruner.stats.gradients("mlp", 0).abs_mean.sum() > 0


def test_state_dict_round_trip(family):
    model, pruner = calibrated(family)
    pruner.prune(0.3)
    state = pruner.state_dict()
    fresh = StructuredPruner(tiny_model(family), progress=False)
    fresh.load_state_dict(state)
    assert fresh.sparsity() == pytest.approx(pruner.sparsity())
    assert fresh.history[-1].sparsity == pytest.approx(pruner.history[-1].sparsity)
    assert torch.equal(fresh.stats.sums["grad.mlp.0.abs"], pruner.stats.sums["grad.mlp.0.abs"])


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_is_a_value_error(sparsity):
    _, pruner = calibrated("llama")
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
        pruner.prune(sparsity)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"importance": "l1"}, "importance must be one of"),
        ({"objective": "mse"}, "objective must be one of"),
        ({"allocation": "layerwise"}, "allocation must be one of"),
        ({"attention": "heads"}, "attention must be one of"),
        ({"min_mlp_keep": 1.0}, "min_mlp_keep must be"),
        ({"micro_batch_size": 0}, "micro_batch_size must be"),
    ],
)
def test_bad_arguments_name_what_is_allowed(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        StructuredPruner(tiny_model("llama"), **kwargs)


def test_unsupported_architecture_names_supported_families():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        StructuredPruner(gpt2)


def test_empty_calibration_is_an_error():
    pruner = StructuredPruner(tiny_model("llama"), progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        pruner.calibrate([])


@pytest.mark.parametrize("importance", ["rku", "taylor", "kinetic", "wanda_sp", "flap"])
def test_prune_before_calibrate_is_an_error_for_data_driven_methods(importance):
    pruner = StructuredPruner(tiny_model("qwen2"), importance=importance, progress=False)
    with pytest.raises(RuntimeError, match="call calibrate"):
        pruner.prune(0.2)


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_data_free_methods_prune_without_calibration(importance):
    pruner = StructuredPruner(tiny_model("qwen2"), importance=importance, progress=False)
    assert abs(pruner.prune(0.3).sparsity - 0.3) < 0.012


def test_checkpointed_calibration_gives_the_same_statistics(family):
    """Activation checkpointing recomputes layers in backward: gate gradients and activation sums are unchanged."""
    batches = tiny_batches(2, batch_size=3, seq_len=10)
    for batch in batches:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batch["labels"][:, :4] = -100  # a masked prompt, as calibration on traces has
    states, calls = [], []
    for checkpoint_layers in (False, True):
        model = tiny_model(family)
        seen = []
        model.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *_: seen.append(1))
        pruner = StructuredPruner(model, importance="rku", checkpoint_layers=checkpoint_layers, progress=False)
        pruner.calibrate(batches)
        states.append(pruner.stats.state_dict())
        calls.append(len(seen))
        assert all("forward" not in layer.__dict__ for layer in pruner.family.decoder_layers())  # wrappers removed
    assert calls == [2, 4]  # checkpointed layers really ran again in backward
    plain, checked = states
    assert plain["counts"] == checked["counts"] and plain["sums"].keys() == checked["sums"].keys()
    assert any(k.startswith("act.") for k in plain["sums"]) and any(not k.startswith("act.") for k in plain["sums"])
    for key, value in plain["sums"].items():
        torch.testing.assert_close(checked["sums"][key], value, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize(
    "importance, objective, blank, message",
    [
        ("rku", "ce", "labels", "every label is -100"),
        ("taylor", "ce", "mask", "every attention_mask is 0"),
        ("rku", "hidden", "mask", "every attention_mask is 0"),
        ("flap", "ce", "mask", "every attention_mask is 0"),
    ],
)
def test_calibration_that_scores_no_token_is_an_error(importance, objective, blank, message):
    batches = tiny_batches()
    for batch in batches:
        if blank == "labels":
            batch["labels"] = torch.full_like(batch["input_ids"], -100)
        else:
            batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    pruner = StructuredPruner(tiny_model("llama"), importance=importance, objective=objective, progress=False)
    with pytest.raises(ValueError, match=f"scored no token in 3 batches.*{message}"):
        pruner.calibrate(batches)


def test_calibration_with_some_scored_tokens_is_accepted():
    batches = tiny_batches()
    for batch in batches[1:]:
        batch["labels"] = torch.full_like(batch["input_ids"], -100)
    assert StructuredPruner(tiny_model("llama"), progress=False).calibrate(batches) == 3


def test_a_model_without_weights_is_named():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(ValueError, match="meta device"):
        StructuredPruner(model, progress=False)
