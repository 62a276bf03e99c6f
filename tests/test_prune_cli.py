"""`python -m rku_lightning.cli.prune` end to end on a tiny saved model and the local GSM8K data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from rku_lightning import load_pruned
from rku_lightning.cli.errors import UsageError
from rku_lightning.cli.prune import main
from rku_lightning.evaluation.calibration import calibration_batches, sample_problems
from rku_lightning.evaluation.data import load_problems


@pytest.fixture
def saved_tiny(tmp_path, family):
    model = tiny_model(family, max_position_embeddings=1024)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tiny_tokenizer(tmp_path).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("importance, objective", [("rku", "ce"), ("rku", "hidden"), ("flap", "ce")])
def test_cli_prunes_and_exports(saved_tiny, shared_data, tmp_path, importance, objective, capsys):
    out = tmp_path / "pruned"
    # `hidden` calibrates on the questions alone: the default `self` source must not generate answers for it.
    source = () if objective == "hidden" else ("--calibration-source", "gold")
    report = main([
        "--model", str(saved_tiny), "--sparsity", "0.3", "--importance", importance, "--objective", objective,
        "--calibration", str(shared_data / "gsm8k" / "train.jsonl"), *source, "--samples", "4",
        "--batch-size", "2", "--max-length", "700", "--out", str(out),
    ])
    assert abs(report["sparsity"] - 0.3) < 0.012
    printed = capsys.readouterr().out
    assert "KV cache bytes/token" in printed and "decoder sparsity" in printed
    model, tokenizer = load_pruned(out)
    plan = json.loads((out / "pruning.json").read_text())
    assert plan["report"]["sparsity"] == report["sparsity"] and plan["cli"]["samples"] == 4
    assert plan["calibration"] == {"requested_samples": 4, "samples": 4}
    assert plan["traces"] is None
    assert sum(p.numel() for p in model.parameters()) == report["total_params_after"]
    with pytest.raises(UsageError, match="already exists.*--overwrite"):
        main(["--model", str(saved_tiny), "--sparsity", "0.3", "--out", str(out)])


def test_calibration_batches_are_a_fixed_sample(shared_data, tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    problems = load_problems(shared_data / "gsm8k" / "train.jsonl", split="train", limit=50)
    assert sample_problems(problems, 8, seed=1) == sample_problems(problems, 8, seed=1)
    assert sample_problems(problems, 8, seed=1) != sample_problems(problems, 8, seed=2)
    batches = calibration_batches(tokenizer, problems, samples=5, batch_size=2, max_length=700)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert all((b["labels"] != -100).any() and (b["labels"] == -100).any() for b in batches)
    questions = calibration_batches(tokenizer, problems, samples=2, batch_size=2, max_length=64, questions_only=True)
    assert "labels" not in questions[0] and questions[0]["input_ids"].shape[1] <= 64
    assert torch.equal(questions[0]["attention_mask"].sum(1) > 0, torch.tensor([True, True]))
    with pytest.raises(ValueError, match="samples must be"):
        sample_problems(problems, 0)


@pytest.mark.parametrize("family", ["llama"])
def test_cli_calibrates_on_the_models_own_traces(saved_tiny, shared_data, tmp_path, monkeypatch):
    """`--calibration-source self` (the default): traces generated once and cached, recorded in pruning.json, and
    different masks from `gold`."""
    monkeypatch.setenv("RKU_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(saved_tiny), "--sparsity", "0.3", "--calibration", str(shared_data / "gsm8k" / "train.jsonl"),
              "--samples", "4", "--batch-size", "2", "--max-length", "700", "--checkpoint-layers"]
    main([*common, "--trace-max-new-tokens", "8", "--out", str(tmp_path / "self1")])
    first = json.loads((tmp_path / "self1" / "pruning.json").read_text())["traces"]
    assert first["hit"] is False and first["traces"] == 4 and first["path"].startswith(str(tmp_path / "cache"))
    main([*common, "--calibration-source", "self", "--trace-max-new-tokens", "8", "--out", str(tmp_path / "self2")])
    assert json.loads((tmp_path / "self2" / "pruning.json").read_text())["traces"]["hit"] is True
    main([*common, "--calibration-source", "gold", "--out", str(tmp_path / "gold")])
    gold, own = (json.loads((tmp_path / name / "pruning.json").read_text()) for name in ("gold", "self1"))
    assert gold["traces"] is None
    assert gold["layers"] != own["layers"] or gold["report"]["layers"] != own["report"]["layers"]


@pytest.mark.parametrize("family", ["llama"])
def test_cli_warns_when_max_length_cuts_the_calibration_solutions(saved_tiny, shared_data, tmp_path):
    """A window shorter than prompt + solution scores the gates on openings only: the CLI says which option to raise."""
    from transformers import AutoTokenizer

    from rku_lightning.evaluation.calibration import sample_problems
    from rku_lightning.evaluation.prompts import solution_lengths

    train = shared_data / "gsm8k" / "train.jsonl"
    problems = sample_problems(load_problems(train, task="gsm8k", split="train").problems, 4, 0)
    lengths = solution_lengths(AutoTokenizer.from_pretrained(saved_tiny), problems)
    window = max(p for p, _ in lengths) + 8
    common = ["--model", str(saved_tiny), "--sparsity", "0.3", "--calibration", str(train), "--calibration-source", "gold",
              "--samples", "4", "--batch-size", "2"]
    with pytest.warns(UserWarning, match=rf"--calibration-source gold: --max-length={window} cuts the end off 4 of 4 solutions") as caught:
        main([*common, "--max-length", str(window), "--out", str(tmp_path / "short")])
    longest = max(p + s for p, s in lengths)
    assert any(f"--max-length={longest} keeps them whole" in str(w.message) for w in caught)  # names the value to use
    assert (tmp_path / "short" / "pruning.json").is_file()  # a warning, not an error: the export is written
