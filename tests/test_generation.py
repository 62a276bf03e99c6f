"""Batched greedy generation: padding-independent, deterministic, stops right, shards like DDP."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from torch.utils.data import DataLoader, DistributedSampler

from rku_lightning.evaluation.data import Problem
from rku_lightning.evaluation.generation import (
    PromptDataset,
    collate_prompts,
    generate_answers,
    generate_batch,
    stop_token_ids,
)
from rku_lightning.evaluation.metrics import ReasoningAccuracy
from rku_lightning.evaluation.prompts import encode_prompts

PROMPTS = ["Question: 2+2?\nAnswer:", "Hi", "Question: What is 12 * 3?\nAnswer:"]


def test_batched_equals_one_by_one_and_is_deterministic(family, tmp_path) -> None:
    model, tokenizer = tiny_model(family, seed=1), tiny_tokenizer(tmp_path)
    batched = generate_answers(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=10, progress=False)
    single = [generate_answers(model, tokenizer, [p], batch_size=1, max_new_tokens=10, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert batched == generate_answers(model, tokenizer, PROMPTS, batch_size=2, max_new_tokens=10, progress=False)
    assert any(batched)


def test_prompts_are_left_padded(tmp_path) -> None:
    tokenizer = tiny_tokenizer(tmp_path)
    batch = encode_prompts(tokenizer, ["ab", "abcd"])
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["input_ids"][0, :2].tolist() == [tokenizer.pad_token_id] * 2


def test_stops_at_eos_and_counts_tokens(tmp_path) -> None:
    model, tokenizer = tiny_model("llama", seed=1), tiny_tokenizer(tmp_path)
    never = [tokenizer.convert_tokens_to_ids("<unk>")]
    free = encode_prompts(tokenizer, PROMPTS[:1])
    full = model.generate(**free, do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=never)
    generated = full[0, free["input_ids"].shape[1] :].tolist()
    assert len(generated) == 8
    texts, lengths = generate_batch(model, tokenizer, PROMPTS[:1], max_new_tokens=8, eos_token_ids=[generated[2]])
    first = generated.index(generated[2])
    assert lengths == [first + 1]
    assert texts == [tokenizer.decode(generated[:first], skip_special_tokens=True).strip()]


def test_restores_training_mode(tmp_path) -> None:
    model, tokenizer = tiny_model("qwen2"), tiny_tokenizer(tmp_path)
    model.train()
    generate_batch(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
    assert model.training


def test_stop_ids_include_chat_end_token(tmp_path) -> None:
    model, tokenizer = tiny_model("qwen2"), tiny_tokenizer(tmp_path)
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(model, tokenizer)


def test_plain_prompts_cut_a_run_on_next_question(tmp_path, monkeypatch) -> None:
    model, tokenizer = tiny_model("llama", seed=1), tiny_tokenizer(tmp_path)
    monkeypatch.setattr(tokenizer, "decode", lambda ids, skip_special_tokens=True: " 4.\n#### 4\nQuestion: 5+5?\nAnswer: 10")
    assert generate_batch(model, tokenizer, PROMPTS[:1], max_new_tokens=2)[0] == ["4.\n#### 4"]


@pytest.mark.parametrize(("kwargs", "name"), [({"max_new_tokens": 0}, "max_new_tokens"), ({"batch_size": 0}, "batch_size")])
def test_bad_arguments(tmp_path, kwargs, name) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=name):
        generate_answers(model, tokenizer, PROMPTS, progress=False, **kwargs)


def test_distributed_sampler_shards_and_metrics_merge(tmp_path) -> None:
    """What a Lightning validation loop does under DDP, with the two ranks run in turn."""
    model, tokenizer = tiny_model("llama", seed=1), tiny_tokenizer(tmp_path)
    problems = [Problem(f"What is {i} + {i}?", None, float(2 * i), i) for i in range(5)]
    dataset = PromptDataset(tokenizer, problems)
    reference = ReasoningAccuracy()  # one process over the 4 problems the two ranks share out
    texts, lengths = generate_batch(model, tokenizer, [item["prompt"] for item in dataset.items[:4]], max_new_tokens=6)
    reference.update(texts, [p.answer for p in problems[:4]], lengths)

    ranks, seen = [], []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False, drop_last=True)
        metric = ReasoningAccuracy()
        for batch in DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate_prompts):
            texts, lengths = generate_batch(model, tokenizer, batch["prompt"], max_new_tokens=6)
            metric.update(texts, batch["answer"], lengths)
            seen.extend(batch["index"])
        ranks.append(metric)
    ranks[0].merge_state(ranks[1])
    assert sorted(seen) == [0, 1, 2, 3]  # drop_last keeps the ranks even, as Lightning does
    merged = ranks[0].compute()
    for key, value in reference.compute().items():
        torch.testing.assert_close(merged[key], value, equal_nan=True)
