"""Plumbing of the peer (Torch-Pruning) and efficiency benchmarks on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_batches, tiny_model, tiny_tokenizer

tp = pytest.importorskip("torch_pruning")

from benchmarks import common, efficiency, peer  # noqa: E402


def _labelled(batches):
    for batch in batches:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batches


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_peer_reaches_engine_parameter_count_and_generates(family, importance):
    model = tiny_model(family)
    target = peer.engine_target(model, 0.4)
    assert target["decoder_params_after"] < target["decoder_params_before"]
    batches = _labelled(tiny_batches()) if importance == "taylor" else None
    example = torch.randint(3, VOCAB, (1, 8))
    info = peer.prune_with_torch_pruning(model, importance, target["decoder_params_after"], example, batches, head_ratio=0.4)
    # Uniform per-layer MLP ratio: within half a channel per layer of the engine's count.
    layers = len(peer.decoder_layers(model))
    assert abs(info["achieved_decoder_params"] - target["decoder_params_after"]) <= layers * 3 * model.config.hidden_size / 2
    assert info["achieved_decoder_params"] == peer.decoder_params(model)
    assert info["kept_query_heads_per_layer"] < 6 and info["kept_query_heads_per_layer"] % 2 == 0  # same count per KV group
    assert all(k < 64 for k in info["kept_mlp_channels_per_layer"])
    assert model.config.num_attention_heads == info["kept_query_heads_per_layer"]
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    ids = torch.randint(3, VOCAB, (2, 6))
    assert model(ids).logits.shape == (2, 6, VOCAB)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_peer_taylor_needs_batches():
    with pytest.raises(ValueError, match="calibration batches"):
        peer.prune_with_torch_pruning(tiny_model("qwen2"), "taylor", 10_000, torch.randint(3, VOCAB, (1, 8)))


def test_nll_only_peer_row_pairs_with_rku_on_the_same_structures(bench_env):
    import json
    import re

    from benchmarks import render
    from benchmarks.oneshot import Row, Settings, run_row

    settings = Settings(generate=False, gsm8k_limit=3, calib_samples=2, calib_max_length=700)
    record = run_row(Row("tiny", "rku", allocation="uniform", sparsity=0.4, attention="query_heads"), settings)
    record.pop("predictions")
    common.write_row(settings.stage, "tiny-rku_qheads-uniform-40", record)
    flags = ["--model=tiny", "--importance=magnitude", "--limit=3", "--calib-samples=2", "--threads=1", "--no-generate"]
    peer.main(flags)
    saved = json.loads(common.row_path(peer.NLL_STAGE, "tiny-tp_magnitude-40").read_text())
    assert saved["gsm8k_correct"] == [] and saved["svamp"] == {} and not common.is_done(peer.STAGE, "tiny-tp_magnitude-40")
    assert len(saved["gsm8k_nll"]["cot_tokens"]) == 3 and saved["gsm8k_nll"]["cot_tokens"] == record["gsm8k_nll"]["cot_tokens"]
    line = next(x for x in render.render().read_text().splitlines() if x.startswith("| tiny-tp_magnitude-40 |"))
    assert re.search(r"\| \d+\.\d{3} \[\d+\.\d\d, \d+\.\d\d\] \|", line), line  # NLL with its interval
    assert re.search(r"\| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] \|$", line), line  # paired gap to rku_qheads
    assert (bench_env / "results" / "oneshot_sparsity_tiny.png").stat().st_size > 1000  # NLL panels only
    # With the head ratio that removes RKU's number of heads per KV group, the heads match RKU's, and the
    # structures column shows both rows' per-layer counts (the channel counts may differ by rounding).
    kept = {(layer["heads"], layer["mlp_channels"]) for layer in record["report"]["layers"]}
    assert len(kept) == 1
    heads, channels = kept.pop()
    head_ratio = (6 - heads) / 6  # tiny models: 6 query heads in 2 KV groups
    peer.main([*flags, f"--head-ratio={head_ratio}"])
    rid = peer.row_id("tiny", "magnitude", 0.4, head_ratio)
    assert rid == f"tiny-tp_magnitude-40-h{round(head_ratio * 100)}" and common.is_done(peer.NLL_STAGE, rid)
    matched = json.loads(common.row_path(peer.NLL_STAGE, rid).read_text())["torch_pruning"]
    assert matched["kept_query_heads_per_layer"] == heads
    mine = (heads, matched["kept_mlp_channels_per_layer"][0])
    expected = "same" if mine == (heads, channels) else f"differ: {heads} heads + {mine[1]} ch; RKU {heads} heads + {channels} ch"
    line = next(x for x in render.render().read_text().splitlines() if x.startswith(f"| {rid} |"))
    assert f"| {expected} |" in line, line
    with pytest.raises(SystemExit):
        peer.main([*flags, "--head-ratio=1.5"])


def test_gqa_rule_removes_the_same_count_per_group():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0])
    assert peer.gqa_heads_to_remove(scores, num_kv=2, per_group=1) == [1, 3]
    assert peer.gqa_heads_to_remove(scores, num_kv=2, per_group=2) == [1, 2, 3, 5]


def test_efficiency_measurements_on_tiny_models(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    tokenizer = tiny_tokenizer(tmp_path)
    dense = tiny_model("qwen2")
    pruned = tiny_model("qwen2")
    pruner = efficiency.StructuredPruner(pruned, importance="magnitude", progress=False)
    report = pruner.prune(0.4)
    efficiency.compact(pruned)
    result = efficiency.compare_models({"dense": dense, "pruned": pruned}, tokenizer, reps=2, new_tokens=3, big_batch=3,
                                       prefill_batch=2, prefill_length=8)
    for name in ("dense", "pruned"):
        row = result[name]
        for key in ("decode_b1_tokens_per_s", "decode_b3_tokens_per_s", "prefill_tokens_per_s", "kv_cache_bytes_per_token_measured", "params"):
            assert row[key] > 0, key
        assert len(row["runs"]["decode_b1"]) == 2
    assert result["dense"]["kv_cache_bytes_per_token_measured"] == report.kv_cache_bytes_per_token_before
    assert result["pruned"]["kv_cache_bytes_per_token_measured"] == report.kv_cache_bytes_per_token_after
    ratios = efficiency.ratios(result["dense"], result["pruned"])
    assert ratios["ideal_ratio"] > 1 and ratios["prefill_tokens_per_s"] > 0
    assert ratios["kv_cache_bytes_per_token_measured"] == pytest.approx(report.kv_cache_bytes_per_token_after / report.kv_cache_bytes_per_token_before, abs=1e-3)
    path = common.write_row("efficiency", "tiny-40", {"ratios_pruned_over_dense": ratios})
    assert path.is_relative_to(tmp_path) and common.is_done("efficiency", "tiny-40")


class _Queue(list):
    put = list.append


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer(tmp_path).save_pretrained(folder)
    return folder


def test_scoring_and_memory_measurements(tmp_path, tiny_folder):
    """The child-process bodies, run in this process (spawning costs tens of seconds on 2 loaded cores)."""
    path = tmp_path / "batches.pt"
    torch.save(_labelled(tiny_batches(n_batches=2)), path)
    spec, threads = {"kind": "source", "path": str(tiny_folder)}, torch.get_num_threads()
    queue = _Queue()
    efficiency._generation_memory_child(spec, 2, 3, threads, queue)
    for method in ("rku", "taylor"):
        efficiency._scoring_child(spec, method, str(path), threads, queue)
    assert not [r for r in queue if "error" in r], queue
    memory, rku, taylor = queue
    assert memory["peak_bytes"] > 0 and memory["tokens_per_s"] > 0 and memory["generation_extra_bytes"] >= 0
    for result in (rku, taylor):
        assert result["seconds"] > 0 and result["peak_bytes"] > 0 and result["scoring_extra_bytes"] >= 0
    assert taylor["group_scores"] > 0 and taylor["backward_s"] >= 0 and taylor["batches"] == 2


def test_child_errors_are_reported():
    queue = _Queue()
    efficiency._scoring_child({"kind": "source", "path": "/nonexistent"}, "rku", "/nonexistent.pt", 1, queue)
    assert "error" in queue[0]


@pytest.mark.slow
def test_generation_memory_in_a_spawned_child(tiny_folder):
    memory = efficiency.in_child(efficiency._generation_memory_child, {"kind": "source", "path": str(tiny_folder)}, 2, 3, 1, timeout=300)
    assert memory["peak_bytes"] >= memory["loaded_bytes"] > 0
