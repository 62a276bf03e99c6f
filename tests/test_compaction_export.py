"""Physical compaction equals masking (GQA, padding, KV cache), and exports reload as they were saved."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_batches, tiny_model, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from rku_lightning import StructuredPruner, compact, load_pruned, save_pruned


def pruned(family: str, allocation: str = "global", attention: str = "groups", sparsity: float = 0.4, **overrides):
    model = tiny_model(family, **overrides)
    pruner = StructuredPruner(model, allocation=allocation, attention=attention, progress=False)
    pruner.calibrate(tiny_batches())
    pruner.prune(sparsity)
    return model, pruner


def cached_logits(model, batch):
    """Logits of a prefill, then of two decode steps through the KV cache."""
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        logits = [out.logits]
        cache, mask, ids = out.past_key_values, batch["attention_mask"], out.logits[:, -1:].argmax(-1)
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            logits.append(out.logits)
            cache, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("attention", ["groups", "query_heads"])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_compacted_logits_equal_masked_logits(family, attention, allocation):
    model, pruner = pruned(family, allocation, attention)
    batch = tiny_batches(1, seed=9)[0]  # left padding on the first sample
    masked = cached_logits(model, batch)
    plan = compact(model)
    compacted = cached_logits(model, batch)
    assert torch.allclose(masked, compacted, atol=1e-4)
    assert not hasattr(model, "rku_gates")
    kept = sum(p.numel() for p in model.parameters())
    assert kept == pruner.history[-1].total_params_after
    view = plan["layers"][0]
    assert model.model.layers[0].mlp.down_proj.in_features == len(view["mlp_channels"])
    assert model.model.layers[0].self_attn.k_proj.out_features == 8 * len(view["kv_groups"])


def test_compacted_model_generates_the_same_tokens(family):
    model, _ = pruned(family)
    batch = tiny_batches(1, seed=4)[0]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    masked = model.generate(**batch, **kwargs)
    compact(model)
    assert torch.equal(model.generate(**batch, **kwargs), masked)


def test_removing_groups_shrinks_the_kv_cache(family):
    model, pruner = pruned(family, sparsity=0.5)
    report = pruner.history[-1]
    assert report.kv_cache_bytes_per_token_after < report.kv_cache_bytes_per_token_before
    compact(model)
    with torch.no_grad():
        cache = model(**tiny_batches(1)[0], use_cache=True).past_key_values
    heads = sum(cache.layers[i].keys.shape[1] for i in range(len(model.model.layers)))
    assert heads * 8 * 2 * 4 == report.kv_cache_bytes_per_token_after


def test_lora_wrappers_are_gated_as_a_whole(family):
    """A LoRA branch must not leak pruned channels: masked+LoRA equals merged+compacted."""
    model = tiny_model(family)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "o_proj", "q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    pruner = StructuredPruner(peft_model, progress=False)
    pruner.calibrate(tiny_batches())
    report = pruner.prune(0.4)
    plain = StructuredPruner(tiny_model(family), importance="magnitude", progress=False).prune(0.4)
    assert report.decoder_params_before == plain.decoder_params_before  # adapters are not model size
    assert report.total_params_before == plain.total_params_before
    batch = tiny_batches(1, seed=2)[0]
    with torch.no_grad():
        masked = peft_model(**batch).logits
    with pytest.raises(ValueError, match="merge"):
        compact(model)
    merged = peft_model.merge_and_unload()
    compact(merged)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, masked, atol=1e-4)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_save_and_load_round_trip(family, allocation, tmp_path):
    model, _ = pruned(family, allocation, tie_word_embeddings=family == "llama")
    compact(model)
    out = save_pruned(model, tiny_tokenizer(tmp_path), tmp_path / "export")
    loaded, tokenizer = load_pruned(out)
    batch = tiny_batches(1, seed=1)[0]
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-6)
    assert tokenizer is not None and tokenizer.padding_side == "left"
    plan = json.loads((out / "pruning.json").read_text())
    assert plan["importance"] == "rku" and plan["allocation"] == allocation
    assert len(plan["layers"]) == 2 and plan["rounds"][-1]["target_sparsity"] == 0.4
    if allocation == "uniform":
        plain = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            assert torch.allclose(model(**batch).logits, plain(**batch).logits, atol=1e-6)
        assert plain.config.intermediate_size == len(plan["layers"][0]["mlp_channels"])


def test_a_loaded_model_can_be_pruned_again(family, tmp_path):
    """Re-pruning an export counts sparsity against the dense model and keeps every round in pruning.json."""
    model, first_pruner = pruned(family, sparsity=0.2)
    dense_decoder = first_pruner.report().decoder_params_before
    compact(model)
    loaded, _ = load_pruned(save_pruned(model, None, tmp_path / "a"))
    pruner = StructuredPruner(loaded, importance="magnitude", progress=False)
    assert pruner.sparsity() == pytest.approx(first_pruner.sparsity())
    with pytest.raises(ValueError, match="already pruned"):
        pruner.prune(0.1)
    report = pruner.prune(0.4)
    assert report.decoder_params_before == dense_decoder
    assert report.sparsity == pytest.approx(0.4, abs=0.02)
    assert report.layers[0].mlp_channels_total == 64 and report.layers[0].kv_groups_total == 2
    plan = compact(loaded)
    decoder_now = sum(p.numel() for p in loaded.model.layers.parameters())
    assert decoder_now == report.decoder_params_after
    first = json.loads((tmp_path / "a" / "pruning.json").read_text())
    for layer_then, layer_now in zip(first["layers"], plan["layers"]):
        assert set(layer_now["mlp_channels"]) <= set(layer_then["mlp_channels"])  # original indices
    again, _ = load_pruned(save_pruned(loaded, None, tmp_path / "b"))
    rounds = json.loads((tmp_path / "b" / "pruning.json").read_text())["rounds"]
    assert [(r["target_sparsity"], r["importance"]) for r in rounds] == [(0.2, "rku"), (0.4, "magnitude")]
    batch = tiny_batches(1)[0]
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, loaded(**batch).logits, atol=1e-6)


def test_export_errors_and_atomicity(tmp_path):
    model, _ = pruned("qwen2")
    with pytest.raises(ValueError, match="compact"):
        save_pruned(model, None, tmp_path / "x")
    compact(model)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(model, None, tmp_path / "taken")

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, BrokenTokenizer(), tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing half-written is left
    save_pruned(model, None, tmp_path / "export")
    save_pruned(model, None, tmp_path / "export", overwrite=True)
    assert (tmp_path / "export" / "pruning.json").is_file()
    with pytest.raises(FileNotFoundError, match="pruning.json"):
        load_pruned(tmp_path)
    with pytest.raises(ValueError, match="no pruning masks"):
        compact(tiny_model("llama"))


def test_exports_and_reports_are_readable_by_others_like_plain_files(tmp_path):
    """tempfile makes private files (0600/0700); a served or shared export must not stay that way."""
    import os

    from rku_lightning.files import write_text_atomic

    old = os.umask(0o022)
    try:
        model, _ = pruned("qwen2")
        compact(model)
        out = save_pruned(model, tiny_tokenizer(tmp_path), tmp_path / "export")
        write_text_atomic(tmp_path / "report" / "report.json", "{}")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {0o644}
    assert (tmp_path / "report" / "report.json").stat().st_mode & 0o777 == 0o644


def test_conform_to_plan_gives_a_dense_or_an_exported_model_the_pruned_shapes(family, tmp_path):
    """What loading a pruned run's checkpoint needs: the module's model sliced to the plan, from dense or from an export."""
    from rku_lightning.pruning.compaction import conform_to_plan

    model, _ = pruned(family, sparsity=0.2)
    compact(model)
    save_pruned(model, None, tmp_path / "a")
    further, _ = load_pruned(tmp_path / "a")
    StructuredPruner(further, importance="magnitude", progress=False).prune(0.4)
    plan = compact(further)
    batch = tiny_batches(1)[0]
    with torch.no_grad():
        expected = further(**batch).logits
    for start in (tiny_model(family), load_pruned(tmp_path / "a")[0]):
        conform_to_plan(start, plan)
        start.load_state_dict(further.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(start(**batch).logits, expected, atol=1e-6, rtol=1e-6)
        conform_to_plan(start, plan)  # already there: unchanged
        assert sum(p.numel() for p in start.parameters()) == sum(p.numel() for p in further.parameters())
    with pytest.raises(ValueError, match="pruned further than the checkpoint's plan"):
        conform_to_plan(further, json.loads((tmp_path / "a" / "pruning.json").read_text()))
