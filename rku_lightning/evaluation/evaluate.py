"""Evaluate a causal LM's math reasoning: greedy answers, CoT NLL by token class, text perplexity.

`evaluate_model` is the reusable entry point (benchmark, Lightning module, the evaluate CLI in
`rku_lightning.cli.evaluate`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import Problem
from .generation import DEFAULT_MAX_NEW_TOKENS, iter_generations
from .metrics import (
    IGNORE_INDEX,
    ReasoningAccuracy,
    TextPerplexity,
    answers_match,
    extract_answer,
    sequence_nll,
    summarise_nll,
    token_kl,
)
from .prompts import build_prompt, collate_left, encode_solution


def _number(value: torch.Tensor | float | int) -> float | int | None:
    """A JSON-safe scalar: NaN (a metric with nothing to average) becomes null."""
    value = value.item() if isinstance(value, torch.Tensor) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


#: Per-question keys that `score_solutions` adds (sums, so questions can be pooled or resampled).
NLL_KEYS = ("cot_nll_sum", "cot_tokens", "cot_nll_reasoning_sum", "cot_tokens_reasoning")


@torch.inference_mode()
def score_solutions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    batch_size: int = 4,
    max_length: int = 1024,
    exemplars: Sequence[Problem] = (),
    progress: bool = True,
    perplexity: bool = True,
) -> tuple[dict[str, float | int | None], list[dict]]:
    """CoT NLL of the gold solutions (prompt masked) and, with `perplexity`, of question + solution as plain text.

    Returns the pooled metrics and one ``{"index", *NLL_KEYS}`` dict per solved problem, so that a
    benchmark can put a bootstrap interval on the NLL. `perplexity=False` halves the cost.
    """
    device = next(model.parameters()).device
    text_ppl = TextPerplexity().to(device)
    solved = [p for p in problems if p.solution]
    per_question: list[dict] = []
    sums = torch.zeros(4, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(solved), batch_size), desc="scoring", unit="batch", disable=not progress):
            chunk = solved[start : start + batch_size]
            batch = collate_left([encode_solution(tokenizer, p, max_length, exemplars) for p in chunk], tokenizer.pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            rows = sequence_nll(logits, batch["labels"], batch["reasoning_mask"]).cpu()
            del logits
            sums += rows.sum(0)
            for problem, row in zip(chunk, rows.tolist()):
                per_question.append({"index": problem.index, **dict(zip(NLL_KEYS, row))})
            if not perplexity:
                continue
            plain = [{"input_ids": tokenizer(f"{p.question}\n{p.solution}", truncation=True, max_length=max_length)["input_ids"]} for p in chunk]
            plain = {key: value.to(device) for key, value in collate_left(plain, tokenizer.pad_token_id).items()}
            logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
            text_ppl.update(logits, plain["input_ids"].masked_fill(plain["attention_mask"] == 0, IGNORE_INDEX))
    finally:
        model.train(was_training)
    scores = {f"cot_{key}": _number(value) for key, value in summarise_nll(sums).items()}
    scores["text_ppl"] = _number(text_ppl.compute()) if solved and perplexity else None
    return scores, per_question


def nll_columns(predictions: Sequence[dict]) -> dict[str, list[float]]:
    """The per-question CoT NLL sums of scored predictions as columns (what benchmarks bootstrap over)."""
    return {key: [p[key] for p in predictions] for key in NLL_KEYS}


def answer_metrics(predictions: Sequence[dict], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """The accuracy metrics of generated answers (`evaluate_model`'s predictions), from the answers alone, so that
    answers gathered from several passes of one model (a benchmark row on more questions) score as one pass would."""
    accuracy = ReasoningAccuracy(max_new_tokens)
    accuracy.update(
        [p["prediction"] for p in predictions], [p["gold_answer"] for p in predictions], [p["generated_tokens"] for p in predictions]
    )
    return {key: _number(value) for key, value in accuracy.compute().items()}


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    exemplars: Sequence[Problem] = (),
    generate: bool = True,
    nll: bool = True,
    nll_batch_size: int | None = None,
    max_length: int = 1024,
    progress: bool = True,
    perplexity: bool = True,
) -> dict:
    """All reasoning metrics of `model` on `problems`.

    Returns ``{"metrics": {name: number}, "predictions": [per-question dict]}``; `generate` and `nll`
    switch off the slow generation pass or the scoring pass (e.g. a cheap per-round check);
    `perplexity=False` skips the plain-text perplexity pass. A question's prediction carries its
    CoT NLL sums (`NLL_KEYS`) when it was scored.
    """
    if not problems:
        raise ValueError("problems: need at least one problem to evaluate")
    if not (generate or nll):
        raise ValueError("generate/nll: at least one of them must be True")
    metrics: dict[str, float | int | None] = {}
    predictions: list[dict] = []
    if generate:
        prompts = [build_prompt(tokenizer, p.question, exemplars) for p in problems]
        started, done = time.perf_counter(), 0
        for texts, lengths in iter_generations(model, tokenizer, prompts, batch_size, max_new_tokens, progress):
            chunk = problems[done : done + len(texts)]
            for problem, text, length in zip(chunk, texts, lengths):
                extracted = extract_answer(text)
                predictions.append(
                    {
                        "index": problem.index,
                        "question": problem.question,
                        "gold_answer": problem.answer,
                        "prediction": text,
                        "extracted_answer": extracted,
                        "correct": answers_match(extracted, problem.answer),
                        "generated_tokens": length,
                    }
                )
            done += len(texts)
        seconds = time.perf_counter() - started
        metrics.update(answer_metrics(predictions, max_new_tokens))
        metrics["generation_s"] = round(seconds, 2)
        tokens = sum(p["generated_tokens"] for p in predictions)
        metrics["generated_tokens_per_s"] = round(tokens / seconds, 2) if seconds > 0 else None
    if nll:
        scores, per_question = score_solutions(
            model, tokenizer, problems, nll_batch_size or batch_size, max_length, exemplars, progress, perplexity
        )
        metrics.update(scores)
        by_index = {p["index"]: p for p in predictions}
        for entry in per_question:
            if entry["index"] in by_index:
                by_index[entry["index"]].update(entry)
            else:
                predictions.append(entry)
    return {"metrics": metrics, "predictions": predictions}


@torch.inference_mode()
def kl_per_problem(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    batch_size: int = 4,
    max_length: int = 1024,
    progress: bool = True,
) -> list[dict]:
    """Teacher-forced KL(reference || model) summed over each problem's solution tokens (prompt masked).

    One dict per scored problem (`index`, `kl_sum`, `tokens`, and the same over the reasoning tokens only,
    `kl_sum_reasoning`, `tokens_reasoning`: numbers and operators, as the CoT NLL split counts them), so
    that benchmarks can resample whole questions for intervals and tell a model that drifted on the
    arithmetic from one that drifted on the prose; problems without a solution are skipped.
    """
    if model.config.vocab_size != reference.config.vocab_size:
        raise ValueError(
            f"reference model: its vocabulary ({reference.config.vocab_size}) differs from the model's "
            f"({model.config.vocab_size}); KL needs the same tokenizer"
        )
    device, reference_device = next(model.parameters()).device, next(reference.parameters()).device
    scored = [p for p in problems if p.solution is not None]
    rows: list[dict] = []
    for start in tqdm(range(0, len(scored), batch_size), desc="KL to reference", unit="batch", disable=not progress):
        chunk = scored[start : start + batch_size]
        batch = collate_left([encode_solution(tokenizer, p, max_length) for p in chunk], tokenizer.pad_token_id)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"].to(device)
        expected = reference(**{k: v.to(reference_device) for k, v in inputs.items()}).logits.to(device)
        kl = token_kl(expected, model(**{k: v.to(device) for k, v in inputs.items()}).logits, labels).double()
        valid = labels[:, 1:] != IGNORE_INDEX
        counts = valid.sum(1).tolist()  # token_kl's values, row by row
        reasoning = batch["reasoning_mask"][:, 1:].to(device)[valid]  # the class of each predicted token
        for problem, part, mask, count in zip(chunk, kl.split(counts), reasoning.split(counts), counts):
            rows.append({"index": problem.index, "kl_sum": part.sum().item(), "tokens": count,
                         "kl_sum_reasoning": part[mask].sum().item(), "tokens_reasoning": int(mask.sum())})
    return rows


def kl_to_reference(
    model: PreTrainedModel, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], **options
) -> float | None:
    """Teacher-forced mean KL(reference || model) per token over the problems' solutions (prompt masked);
    `options` are `kl_per_problem`'s.

    Pass the reference's own answers as solutions (`traces.as_problems`) to measure fidelity on what
    the dense model would write, or gold problems for the data set's text. None when nothing is scored.
    """
    rows = kl_per_problem(model, reference, tokenizer, problems, **options)
    tokens = sum(r["tokens"] for r in rows)
    return sum(r["kl_sum"] for r in rows) / tokens if tokens else None
