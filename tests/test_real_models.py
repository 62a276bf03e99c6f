"""The engine on the real embedded models: load, calibrate on GSM8K text, prune, compact, generate."""

from __future__ import annotations

import json

import pytest
import torch

from rku_lightning import StructuredPruner, compact, load_causal_lm

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("name", ["embedded:smollm2-135m-instruct", "embedded:qwen2.5-coder-0.5b-instruct"])
def test_prune_real_embedded_model(name, shared_data):
    model, tokenizer = load_causal_lm(name)
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:4]
    texts = [json.loads(line)["question"] + "\n" + json.loads(line)["answer"] for line in lines]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64))
    pruner = StructuredPruner(model, importance="rku", progress=False)
    pruner.calibrate([batch])
    first = pruner.prune(0.2)
    assert abs(first.sparsity - 0.2) < 0.01
    second = pruner.prune(0.4)
    assert abs(second.sparsity - 0.4) < 0.01
    assert second.kv_cache_bytes_per_token_after <= first.kv_cache_bytes_per_token_after

    prompt = tokenizer(["Natalia sold 48 clips in April"], return_tensors="pt")
    with torch.no_grad():
        masked = model(**prompt).logits
    compact(model)
    assert sum(p.numel() for p in model.parameters()) == second.total_params_after
    with torch.no_grad():
        assert torch.allclose(model(**prompt).logits, masked, atol=1e-3)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
