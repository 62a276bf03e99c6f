"""Prompt/solution encoding, evaluate_model end to end on a tiny model, the CLI, and one real model."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from rku_lightning.cli.errors import UsageError
from rku_lightning.cli.evaluate import default_data, main
from rku_lightning.evaluation.data import Problem, load_problems
from rku_lightning.evaluation.evaluate import evaluate_model
from rku_lightning.evaluation.metrics import IGNORE_INDEX
from rku_lightning.evaluation.prompts import INSTRUCTION, build_prompt, collate_left, encode_solution, select_exemplars

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROBLEM = Problem("Tom has 3 bags of 4 apples. How many apples?", "3 * 4 = <<3*4=12>>12 apples.\n#### 12", 12.0, 7)


def _chat_tokenizer(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_plain_prompt_layout_and_exemplars(tmp_path) -> None:
    tokenizer = tiny_tokenizer(tmp_path)
    shot = Problem("What is 1+1?", "1+1=2\n#### 2", 2.0, 0)
    prompt = build_prompt(tokenizer, PROBLEM.question, [shot])
    assert prompt == f"{INSTRUCTION}\n\nQuestion: What is 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: {PROBLEM.question}\nAnswer:"


def test_chat_prompt_uses_template(tmp_path) -> None:
    prompt = build_prompt(_chat_tokenizer(tmp_path), PROBLEM.question)
    assert prompt == f"<|im_start|>user\n{INSTRUCTION}\n\n{PROBLEM.question}<|im_end|>\n<|im_start|>assistant\n"


def test_exemplars_are_seeded_and_exclude_test_questions() -> None:
    pool = [Problem(f"q{i}", f"#### {i}", float(i), i) for i in range(20)] + [Problem("nosol", None, 1.0, 20)]
    first = select_exemplars(pool, 3, seed=5, exclude=[pool[0]])
    assert first == select_exemplars(pool, 3, seed=5, exclude=[pool[0]])
    assert first != select_exemplars(pool, 3, seed=6, exclude=[pool[0]])
    assert all(p.solution and p.question != "q0" for p in first)
    with pytest.raises(ValueError, match="k"):
        select_exemplars(pool, 21)


@pytest.mark.parametrize("chat", [False, True])
def test_encode_solution_masks_prompt_and_marks_reasoning(tmp_path, chat) -> None:
    tokenizer = _chat_tokenizer(tmp_path) if chat else tiny_tokenizer(tmp_path)
    encoded = encode_solution(tokenizer, PROBLEM, max_length=1024)
    ids, labels, reasoning = encoded["input_ids"], encoded["labels"], encoded["reasoning_mask"]
    prompt_length = int((labels == IGNORE_INDEX).sum())
    prompt_ids = tokenizer(build_prompt(tokenizer, PROBLEM.question), add_special_tokens=not chat)["input_ids"]
    assert ids[:prompt_length].tolist() == prompt_ids
    assert torch.equal(labels[prompt_length:], ids[prompt_length:])
    assert not reasoning[:prompt_length].any()
    target = tokenizer.decode(ids[prompt_length:])
    closing = "<|im_end|>\n" if chat else "</s>"
    assert target == (PROBLEM.solution if chat else " " + PROBLEM.solution) + closing
    marked = "".join(t if r else "_" for t, r in zip(tokenizer.convert_ids_to_tokens(ids[prompt_length:]), reasoning[prompt_length:]))
    assert marked.startswith(("3_*_4_=_<<3*4=12>>12_", "_3_*_4_=_<<3*4=12>>12_"))
    assert marked.rstrip("_").endswith("12")
    short = encode_solution(tokenizer, PROBLEM, max_length=prompt_length + 3)
    assert len(short["input_ids"]) == prompt_length + 3 and (short["labels"] != IGNORE_INDEX).sum() == 3
    with pytest.raises(ValueError, match="max_length"):
        encode_solution(tokenizer, PROBLEM, max_length=prompt_length)


def test_collate_left_pads_with_neutral_values(tmp_path) -> None:
    tokenizer = tiny_tokenizer(tmp_path)
    a = encode_solution(tokenizer, PROBLEM, 1024)
    b = encode_solution(tokenizer, Problem("Q?", "#### 1", 1.0, 0), 1024)
    batch = collate_left([a, b], tokenizer.pad_token_id)
    pad = len(a["input_ids"]) - len(b["input_ids"])
    assert batch["input_ids"].shape == (2, len(a["input_ids"]))
    assert (batch["input_ids"][1, :pad] == tokenizer.pad_token_id).all()
    assert (batch["attention_mask"][1, :pad] == 0).all() and (batch["labels"][1, :pad] == IGNORE_INDEX).all()
    assert not batch["reasoning_mask"][1, :pad].any()
    with pytest.raises(ValueError, match="features"):
        collate_left([], 0)


def _check_metric_ranges(metrics: dict) -> None:
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["no_answer_rate"] <= 1.0
    assert metrics["total"] == metrics["correct"] + (metrics["total"] - metrics["correct"])
    for key in ("cot_nll", "cot_nll_reasoning", "cot_nll_other"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0
    assert metrics["cot_ppl"] >= 1 and metrics["text_ppl"] >= 1
    assert metrics["cot_tokens"] == metrics["cot_tokens_reasoning"] + metrics["cot_tokens_other"] > 0


def test_evaluate_model_tiny_end_to_end(family, tmp_path, shared_data) -> None:
    model, tokenizer = tiny_model(family, seed=1), tiny_tokenizer(tmp_path)
    problems = load_problems(shared_data / "gsm8k" / "test.jsonl", limit=3).problems
    shots = select_exemplars(load_problems(shared_data / "gsm8k" / "train.jsonl", limit=50).problems, 1)
    result = evaluate_model(model, tokenizer, problems, batch_size=2, max_new_tokens=8, exemplars=shots, progress=False)
    metrics = result["metrics"]
    _check_metric_ranges(metrics)
    assert metrics["total"] == 3 and 0 < metrics["mean_tokens"] <= 8
    assert [p["index"] for p in result["predictions"]] == [0, 1, 2]
    assert {"prediction", "extracted_answer", "correct", "gold_answer", "generated_tokens"} <= set(result["predictions"][0])


def test_per_question_nll_pools_to_the_reported_nll(tmp_path, shared_data) -> None:
    """The benchmark bootstraps over these sums, so they must add up to the pooled metric."""
    model, tokenizer = tiny_model("qwen2", seed=2), tiny_tokenizer(tmp_path)
    problems = load_problems(shared_data / "gsm8k" / "test.jsonl", limit=3).problems
    result = evaluate_model(model, tokenizer, problems, generate=False, nll_batch_size=2, perplexity=False, progress=False)
    rows, metrics = result["predictions"], result["metrics"]
    assert [p["index"] for p in rows] == [0, 1, 2] and metrics["text_ppl"] is None
    assert sum(p["cot_tokens"] for p in rows) == metrics["cot_tokens"] and all(p["cot_tokens"] > 0 for p in rows)
    assert sum(p["cot_nll_sum"] for p in rows) / metrics["cot_tokens"] == pytest.approx(metrics["cot_nll"], rel=1e-5)
    reasoning = sum(p["cot_nll_reasoning_sum"] for p in rows) / sum(p["cot_tokens_reasoning"] for p in rows)
    assert reasoning == pytest.approx(metrics["cot_nll_reasoning"], rel=1e-5)
    both = evaluate_model(model, tokenizer, problems, batch_size=3, max_new_tokens=2, progress=False)
    assert both["metrics"]["cot_nll"] == pytest.approx(metrics["cot_nll"], rel=1e-5)
    assert all("correct" in p and p["cot_tokens"] > 0 for p in both["predictions"])


def test_evaluate_model_svamp_has_no_cot_scores(tmp_path, shared_data) -> None:
    problems = load_problems(shared_data / "svamp" / "test.jsonl", "svamp", limit=2).problems
    result = evaluate_model(tiny_model("llama"), tiny_tokenizer(tmp_path), problems, max_new_tokens=4, progress=False)
    assert result["metrics"]["total"] == 2
    assert result["metrics"]["cot_nll"] is None and result["metrics"]["cot_tokens"] == 0


def test_evaluate_model_rejects_nothing_to_do(tmp_path) -> None:
    with pytest.raises(ValueError, match="problems"):
        evaluate_model(tiny_model("llama"), tiny_tokenizer(tmp_path), [])
    with pytest.raises(ValueError, match="generate/nll"):
        evaluate_model(tiny_model("llama"), tiny_tokenizer(tmp_path), [PROBLEM], generate=False, nll=False)


def _check_report(report_path, data_path, limit: int) -> list[dict]:
    report = json.loads(report_path.read_text())
    assert report["data"]["path"] == str(data_path.resolve())
    assert report["data"]["sha256"] == hashlib.sha256(data_path.read_bytes()).hexdigest()
    assert report["indices"] == list(range(limit))
    _check_metric_ranges(report["metrics"])
    predictions = [json.loads(line) for line in (report_path.parent / report["predictions_file"]).read_text().splitlines()]
    assert [p["index"] for p in predictions] == report["indices"]
    assert not list(report_path.parent.glob("*.tmp"))
    return predictions


def test_cli_end_to_end(tmp_path, shared_data, capsys) -> None:
    model_dir = tmp_path / "tiny"
    tiny_model("qwen2", seed=1).save_pretrained(model_dir)
    tiny_tokenizer(tmp_path).save_pretrained(model_dir)
    data_path = shared_data / "gsm8k" / "test.jsonl"
    out = tmp_path / "out" / "report.json"
    argv = ["--model", str(model_dir), "--task", "gsm8k", "--data", str(data_path), "--limit", "3",
            "--batch-size", "2", "--max-new-tokens", "6", "--few-shot", "1", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    _check_report(out, data_path, 3)
    report = json.loads(out.read_text())
    assert report["model"] == str(model_dir) and len(report["settings"]["few_shot_indices"]) == 1
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "cot_nll_reasoning" in printed


def test_cli_rejects_bad_numbers(tmp_path) -> None:
    with pytest.raises(UsageError, match="--batch-size"):
        main(["--model", "x", "--batch-size", "0", "--json", str(tmp_path / "r.json")])


def test_default_data_follows_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RKU_SHARED_DATA", str(tmp_path))
    assert default_data("svamp") == tmp_path / "svamp" / "test.jsonl"
    with pytest.raises(ValueError, match="data"):
        default_data("jsonl")


@pytest.mark.real_model
def test_real_qwen_pipeline(tmp_path, shared_data) -> None:
    """The embedded Qwen model through the CLI on two questions: the pipeline and report, not accuracy."""
    data_path = shared_data / "gsm8k" / "test.jsonl"
    out = tmp_path / "qwen.json"
    argv = ["--model", "embedded:qwen2.5-coder-0.5b-instruct", "--data", str(data_path), "--limit", "2",
            "--batch-size", "2", "--max-new-tokens", "48", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    predictions = _check_report(out, data_path, 2)
    assert all(p["prediction"] and p["generated_tokens"] > 0 for p in predictions)
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["cot_tokens_reasoning"] > 0 and metrics["cot_tokens_other"] > 0


def test_cli_measures_kl_to_a_reference_model(tmp_path, shared_data, monkeypatch) -> None:
    """`--reference-model`: 0 against itself, > 0 for a pruned copy; the reference's answers are cached traces."""
    from rku_lightning import StructuredPruner, compact, save_pruned

    monkeypatch.setenv("RKU_CACHE", str(tmp_path / "cache"))
    dense_dir, pruned_dir = tmp_path / "tiny", tmp_path / "pruned"
    model, tokenizer = tiny_model("qwen2", seed=1, max_position_embeddings=1024), tiny_tokenizer(tmp_path)
    model.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    StructuredPruner(model, importance="magnitude", allocation="uniform", progress=False).prune(0.3)
    compact(model)
    save_pruned(model, tokenizer, pruned_dir)
    data_path = shared_data / "gsm8k" / "test.jsonl"
    common = ["--data", str(data_path), "--limit", "2", "--batch-size", "2", "--max-new-tokens", "6", "--no-generate",
              "--no-progress", "--reference-model", str(dense_dir)]
    for name, source in (("self", dense_dir), ("pruned", pruned_dir)):
        assert main(["--model", str(source), *common, "--json", str(tmp_path / f"{name}.json")]) == 0
    same, pruned = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("self", "pruned"))
    assert same["metrics"]["kl_to_reference"] == pytest.approx(0, abs=1e-6)
    assert same["metrics"]["kl_to_reference_gold"] == pytest.approx(0, abs=1e-6)
    assert pruned["metrics"]["kl_to_reference"] > 1e-5 and pruned["metrics"]["kl_to_reference_gold"] > 1e-5
    assert same["reference_traces"]["hit"] is False and pruned["reference_traces"]["hit"] is True


def test_kl_to_reference_refuses_another_vocabulary(tmp_path) -> None:
    from rku_lightning.evaluation.evaluate import kl_to_reference

    with pytest.raises(ValueError, match="vocabulary"):
        kl_to_reference(tiny_model("llama"), tiny_model("llama", vocab_size=80), tiny_tokenizer(tmp_path), [PROBLEM])


def test_kl_per_problem_splits_the_mean_by_question(tmp_path) -> None:
    """Per-question KL sums (for paired intervals) add up to the per-token mean that the metric computes."""
    from rku_lightning.evaluation.evaluate import kl_per_problem, kl_to_reference
    from rku_lightning.evaluation.metrics import KLToReference

    tokenizer = tiny_tokenizer(tmp_path)
    dense, other = tiny_model("qwen2", seed=1), tiny_model("qwen2", seed=2)
    problems = [PROBLEM, Problem("Ann has 2 pens and buys 5 more. How many?", "2 + 5 = 7\n#### 7", 7.0, 3),
                Problem("No worked solution here.", None, 1.0, 9)]
    rows = kl_per_problem(other, dense, tokenizer, problems, batch_size=2, progress=False)
    assert [r["index"] for r in rows] == [7, 3] and all(r["tokens"] > 0 and r["kl_sum"] > 0 for r in rows)
    metric, reasoning = KLToReference(), KLToReference()
    for p in problems[:2]:
        batch = collate_left([encode_solution(tokenizer, p, 1024)], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = [m(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits for m in (dense, other)]
        metric.update(*logits, batch["labels"])
        reasoning.update(*logits, batch["labels"].masked_fill(~batch["reasoning_mask"], -100))  # numbers and operators only
    mean = sum(r["kl_sum"] for r in rows) / sum(r["tokens"] for r in rows)
    assert mean == pytest.approx(metric.compute().item(), rel=1e-4)
    assert 0 < sum(r["tokens_reasoning"] for r in rows) < sum(r["tokens"] for r in rows)
    assert sum(r["kl_sum_reasoning"] for r in rows) / sum(r["tokens_reasoning"] for r in rows) == pytest.approx(
        reasoning.compute().item(), rel=1e-4)
    assert kl_to_reference(other, dense, tokenizer, problems, batch_size=1, progress=False) == pytest.approx(mean, rel=1e-4)
    assert all(r["kl_sum"] == pytest.approx(0, abs=1e-6) for r in kl_per_problem(dense, dense, tokenizer, problems, progress=False))
