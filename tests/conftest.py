"""Shared fixtures: tiny randomly initialised Llama / Mistral / Qwen2 models built from configs, and the data folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rku_lightning.files import STALE_AFTER_S
from rku_lightning.paths import CACHE_ENV, shared_data_dir
from rku_lightning.pruning.importance import Importance
from rku_lightning.pruning.structures import num_units

SHARED_DATA = shared_data_dir()
VOCAB = 96
#: model_type -> (config class, causal-LM class) of every family a tiny model is built for.
TINY_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_config(family: str, **overrides):
    """A 2-layer GQA model (6 query heads over 2 KV groups) that runs in milliseconds."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    return TINY_CLASSES[family][0](**common)


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = TINY_CLASSES[family][1](tiny_config(family, **overrides)).eval()
    # Random init leaves biases at zero; give Qwen2's q/k/v biases values so that slicing them is tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


class LowIndexFirst(Importance):
    """A user's own scorer, never registered: unit j scores j, so the lowest indices are pruned first."""

    name = "low_index_first"

    def layer_scores(self, view, kind, stats, alive):
        return torch.arange(num_units(view, kind), dtype=torch.float64)


def backdate(path: Path, age_s: float = STALE_AFTER_S + 3600) -> Path:
    """Give `path` the mtime of a file written `age_s` ago: what a sweep by age sees of an old run's litter."""
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def tiny_batches(n_batches: int = 3, batch_size: int = 2, seq_len: int = 12, seed: int = 0, pad: bool = True):
    """Random token batches with left padding on the first sample, as a tokenizer would make them."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=gen)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, :3] = 0
            ids[0, :3] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def tiny_tokenizer(tmp_path: Path) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over digits, letters and punctuation, built without downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = list("0123456789+-*/=.,$#<>()?! abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n:'")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


BPE_VOCAB = 320
BPE_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? Let's think step by step.",
    "The answer is 72. She sold 48 + 24 = 72 clips.",
]


def tiny_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer (what llama.cpp's `gpt2` vocabulary reads), trained on three lines.

    <pad>, <s>, </s> are ids 0-2 like the tiny configs'; it has fewer than `BPE_VOCAB` tokens, so a model
    with `vocab_size=BPE_VOCAB` also has embedding rows past the tokenizer, as Qwen2's do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB - 8, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(BPE_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(autouse=True)
def _test_cache(request, tmp_path_factory, monkeypatch) -> None:
    """Traces and conversions of tiny models go to this session's own cache, not the user's `RKU_CACHE`; tests
    on the embedded models keep the user's cache, where their converted weights already are."""
    if request.node.get_closest_marker("real_model") is None:
        monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(params=["llama", "qwen2"])
def family(request) -> str:
    return request.param


@pytest.fixture
def shared_data() -> Path:
    # A missing folder is a broken checkout or resolver, not a reason to skip.
    assert SHARED_DATA.is_dir(), f"shared data folder {SHARED_DATA} is missing: set RKU_SHARED_DATA"
    return SHARED_DATA


@pytest.fixture
def bench_env(tmp_path, monkeypatch, shared_data) -> Path:
    """Benchmark rows on a saved tiny Qwen2 model (`tiny`), with results and scratch in `tmp_path`."""
    import benchmarks.answers as answers
    import benchmarks.common as common
    import benchmarks.oneshot as oneshot
    import benchmarks.render as render

    folder = tmp_path / "tiny"
    tiny_model("qwen2", max_position_embeddings=1024).save_pretrained(folder)
    tiny_tokenizer(tmp_path).save_pretrained(folder)
    monkeypatch.setitem(common.MODELS, "tiny", str(folder))
    monkeypatch.setattr(oneshot, "WORK", tmp_path / "work")
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(render, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(answers, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(render, "RESULTS_MD", tmp_path / "RESULTS.md")
    return tmp_path
