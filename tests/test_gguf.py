"""GGUF exports run in llama.cpp itself with transformers' logits, per-layer shapes (llama.cpp `deci`) included.

llama.cpp is `llama-cpp-python` built from its PyPI source release (`make llama-cpp`, cached by pip after
the first build). `make test` sets RKU_REQUIRE_LLAMA_CPP=1, so CI fails rather than skips without it.

Tolerance of the f32 comparisons: both sides compute in float32 from the same float32 weights, and
llama.cpp runs with an f32 KV cache (its default f16 cache would round keys and values to 2^-11), so
the logits differ only by summation order and llama.cpp's own RoPE/softmax kernels: float32 rounding
(2^-24) grown over a few hundred-term dot products and the layers, measured at 1.3e-5 for the tiny
models (|logit| up to ~5.5, initializer_range 0.2 so that attention is peaked and RoPE matters).
`TINY_ATOL` = 1e-3 leaves two orders of magnitude for other CPUs' kernels and stays far below what a
wrong export does: Q/K rows left in transformers' order move these logits by ~7 (tested below).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import BPE_CORPUS, BPE_VOCAB, tiny_batches, tiny_bpe_tokenizer, tiny_model
from gguf import GGUFReader

from rku_lightning import StructuredPruner, compact, load_causal_lm, save_gguf, save_pruned
from rku_lightning.pruning import gguf as gguf_export
from rku_lightning.pruning.families import get_family

TINY_ATOL = 1e-3
PROMPTS = [BPE_CORPUS[0], BPE_CORPUS[1][:40], "She sold 48 + 24 = 72 clips in May."]


@pytest.fixture(scope="session")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("RKU_REQUIRE_LLAMA_CPP"):
            raise
        pytest.skip("llama-cpp-python is not installed; `make llama-cpp` builds it from source (README, GGUF)")
    return llama_cpp


def pruned_tiny(family: str, allocation: str, sparsity: float = 0.4, **overrides):
    """A 3-layer tiny model with the BPE tokenizer's vocabulary, pruned and compacted."""
    model = tiny_model(family, vocab_size=BPE_VOCAB, num_hidden_layers=3, initializer_range=0.2, **overrides)
    pruner = StructuredPruner(model, importance="magnitude", allocation=allocation, progress=False)
    pruner.calibrate(tiny_batches())
    pruner.prune(sparsity)
    plan = compact(model)
    return model, plan


def llama_cpp_logits(llama_cpp, path, ids: list[int]) -> np.ndarray:
    # type_k/type_v 0 = GGML_TYPE_F32: an f32 KV cache (see the module docstring).
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return logits


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def gguf_fields(path) -> dict:
    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.")}


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_llama_cpp_logits_equal_transformers(llama_cpp, family, allocation, tmp_path):
    model, plan = pruned_tiny(family, allocation)
    tokenizer = tiny_bpe_tokenizer()
    if allocation == "global":  # the case that needs llama.cpp's per-layer path
        assert not plan["uniform_shapes"]
        assert any(len(layer["kv_groups"]) < 2 for layer in plan["layers"]), "no KV group was removed"
    path = save_pruned(model, tokenizer, tmp_path / "model.gguf", format="gguf", gguf_dtype="f32")
    fields = gguf_fields(path)
    arch = fields["general.architecture"]
    assert arch == ("deci" if allocation == "global" else family)
    heads = fields[f"{arch}.attention.head_count_kv"]
    assert heads == ([len(x["kv_groups"]) for x in plan["layers"]] if allocation == "global" else len(plan["layers"][0]["kv_groups"]))
    assert json.loads(fields["rku_lightning.pruning"])["layers"] == plan["layers"]
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert vocab.tokenize(prompt.encode(), add_bos=False, special=False) == ids
        np.testing.assert_allclose(llama_cpp_logits(llama_cpp, path, ids), hf_logits(model, ids), rtol=0, atol=TINY_ATOL)
    vocab.close()


def test_unpermuted_rope_rows_would_be_caught(llama_cpp, monkeypatch, tmp_path):
    """The tolerance separates right from wrong: exporting deci Q/K rows in transformers' order fails it."""
    model, _ = pruned_tiny("llama", "global")
    monkeypatch.setattr(gguf_export, "_permute_rotary_rows", lambda tensor, head_dim: tensor)
    path = save_pruned(model, tiny_bpe_tokenizer(), tmp_path / "wrong.gguf", format="gguf", gguf_dtype="f32")
    ids = tiny_bpe_tokenizer()(PROMPTS[0])["input_ids"]
    assert np.abs(llama_cpp_logits(llama_cpp, path, ids) - hf_logits(model, ids)).max() > 1000 * TINY_ATOL


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_exports_run(llama_cpp, dtype, tmp_path):
    """f16/bf16 round weights (and llama.cpp's matmul inputs) to 2^-11 / 2^-8 relative: measured 0.014 / 0.089 here.

    The bounds leave ~3.5x for other kernels (bf16's is 8x f16's: three fewer mantissa bits) and are still
    20x below the error of a wrong export (~7).
    """
    model, _ = pruned_tiny("qwen2", "global", tie_word_embeddings=True)
    path = save_pruned(model, tiny_bpe_tokenizer(), tmp_path / "half.gguf", format="gguf", gguf_dtype=dtype)
    ids = tiny_bpe_tokenizer()(PROMPTS[2])["input_ids"]
    diff = np.abs(llama_cpp_logits(llama_cpp, path, ids) - hf_logits(model, ids)).max()
    assert diff < {"f16": 5e-2, "bf16": 4e-1}[dtype]
    assert "output.weight" not in {t.name for t in GGUFReader(str(path)).tensors}  # tied


def test_a_uniform_gguf_loads_back_into_transformers(family, tmp_path):
    """Written under the family's own architecture, a uniform GGUF is one transformers reads (and un-permutes)."""
    model, _ = pruned_tiny(family, "uniform")
    path = save_pruned(model, tiny_bpe_tokenizer(), tmp_path / "model.gguf", format="gguf", gguf_dtype="f32")
    back, _ = load_causal_lm(path)
    ids = tiny_bpe_tokenizer()(PROMPTS[2])["input_ids"]
    np.testing.assert_allclose(hf_logits(back, ids), hf_logits(model, ids), rtol=0, atol=1e-5)


def test_gguf_export_errors(tmp_path):
    model, _ = pruned_tiny("llama", "global")
    tokenizer = tiny_bpe_tokenizer()
    with pytest.raises(ValueError, match=r"\.gguf"):
        save_pruned(model, tokenizer, tmp_path / "model", format="gguf")
    with pytest.raises(ValueError, match="llama-quantize"):
        save_pruned(model, tokenizer, tmp_path / "m.gguf", format="gguf", gguf_dtype="q4_0")
    with pytest.raises(ValueError, match="format must be one of"):
        save_pruned(model, tokenizer, tmp_path / "m.gguf", format="onnx")
    with pytest.raises(ValueError, match="tokenizer"):
        save_pruned(model, None, tmp_path / "m.gguf", format="gguf")
    path = save_pruned(model, tokenizer, tmp_path / "m.gguf", format="gguf")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(model, tokenizer, path, format="gguf")
    save_pruned(model, tokenizer, path, format="gguf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left


def test_unknown_pre_tokenizer_is_refused():
    from tokenizers import pre_tokenizers

    tokenizer = tiny_bpe_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="pre_tokenizer"):
        gguf_export.llama_cpp_pre_tokenizer(json.loads(tokenizer.backend_tokenizer.to_str()))


def test_family_tells_the_llama_cpp_architecture(family):
    family_ = get_family(tiny_model(family))
    assert gguf_export.gguf_arch(family_) == family  # dense: every layer the same shape


@pytest.mark.real_model
def test_smollm2_pruned_40_percent_runs_in_llama_cpp(llama_cpp, shared_data, tmp_path):
    """The embedded SmolLM2, RKU 40 % global: same next-token logits and the same 16-token greedy continuation.

    Measured: max |difference| 8.6e-4 at |logit| up to 40 (f32 weights and KV cache); 1e-2 leaves 10x.
    """
    from rku_lightning.evaluation.calibration import calibration_batches
    from rku_lightning.evaluation.data import load_problems

    model, tokenizer = load_causal_lm("embedded:smollm2-135m-instruct")
    problems = load_problems(shared_data / "gsm8k" / "train.jsonl", split="train")
    pruner = StructuredPruner(model, importance="rku", allocation="global", progress=False)
    pruner.calibrate(calibration_batches(tokenizer, problems, samples=8, batch_size=4, max_length=256))
    pruner.prune(0.4)
    plan = compact(model)
    assert not plan["uniform_shapes"]
    path = save_pruned(model, tokenizer, tmp_path / "smollm2-40.gguf", format="gguf", gguf_dtype="f32")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 times 7?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    np.testing.assert_allclose(np.array(llm.scores[: len(ids)]), hf_logits(model, ids), rtol=0, atol=1e-2)
    llm.reset()
    ours = [t for _, t in zip(range(16), llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0))]
    llm.close()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids):]
    assert ours == theirs.tolist()


def test_decode_benchmark_interleaves_and_renders(llama_cpp, tmp_path):
    """benchmarks/llama_cpp_decode on tiny GGUFs: one speed per repeat and model, ratios per repeat, a table row."""
    from benchmarks import llama_cpp_decode, render

    tokenizer = tiny_bpe_tokenizer()
    dense = tiny_model("llama", vocab_size=BPE_VOCAB, num_hidden_layers=3, initializer_range=0.2)
    pruned, _ = pruned_tiny("llama", "global")
    paths = {"dense": save_gguf(dense, tokenizer, tmp_path / "dense.gguf"),
             "pruned": save_pruned(pruned, tokenizer, tmp_path / "pruned.gguf", format="gguf")}
    ids = tokenizer(PROMPTS[0])["input_ids"]
    measured = llama_cpp_decode.compare({k: str(v) for k, v in paths.items()}, ids, reps=3, new_tokens=4, threads=1, flash_attn=True)
    speeds = measured["decode_b1_tokens_per_s"]
    ratios = [p / d for p, d in zip(speeds["pruned"]["runs"], speeds["dense"]["runs"])]
    assert measured["ratio_pruned_over_dense"]["runs"] == pytest.approx(ratios, rel=1e-2)
    assert len(measured["mean_based"]["decode_b1_tokens_per_s"]["dense"]["runs"]) == 3
    row = {"row_id": "tiny-40", "commit": "0123456789", "transformers": None, **measured,
           "pruned_model": {"report": {"total_params_before": 30, "total_params_after": 20}},
           "settings": {"dtype": "f16", "threads": 1, "reps": 3, "flash_attn": True}}
    line = next(x for x in render.llama_cpp_section([row]) if x.startswith("| tiny-40 |"))
    assert f"{measured['ratio_pruned_over_dense']['median']:.3f} [" in line and "| 1.500 |" in line
