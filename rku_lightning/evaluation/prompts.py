"""Prompts for math word problems and (prompt, solution) training pairs with the prompt masked.

Chat models get their own chat template (an instruction, optional few-shot turns, the question);
tokenizers without a template get a plain ``Question: ... / Answer:`` layout. The gold solution is
asked for in GSM8K's own format (reasoning, then a final ``#### N`` line), so the same encoding
serves CoT NLL evaluation and recovery fine-tuning. See docs/evaluation.md.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

from .data import Problem
from .metrics import IGNORE_INDEX, classify_tokens, token_offsets

INSTRUCTION = (
    "Solve the math word problem. Reason step by step, then give the final answer as a number "
    "on the last line in the form '#### <number>'."
)
# Plain-text models run on past their answer into a new exemplar; generations are cut there.
PLAIN_STOP_STRINGS = ("\nQuestion:",)


def uses_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def gold_solution(problem: Problem) -> str:
    """The target text for a problem: its worked solution (a trace may be empty), or ``#### N`` when it has none."""
    if problem.solution is not None:
        return problem.solution
    answer = int(problem.answer) if float(problem.answer).is_integer() else problem.answer
    return f"#### {answer}"


def select_exemplars(pool: Sequence[Problem], k: int, seed: int = 0, exclude: Sequence[Problem] = ()) -> list[Problem]:
    """`k` solved problems drawn from `pool` with a fixed seed, never one of the `exclude` questions."""
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    excluded = {problem.question for problem in exclude}
    candidates = [p for p in pool if p.solution and p.question not in excluded]
    if k > len(candidates):
        raise ValueError(f"k: asked for {k} exemplars but the pool has only {len(candidates)} with worked solutions")
    return random.Random(seed).sample(candidates, k)


def build_messages(question: str, exemplars: Sequence[Problem] = ()) -> list[dict[str, str]]:
    """Chat turns: exemplars as earlier user/assistant exchanges, the instruction on every user turn."""
    messages = []
    for example in exemplars:
        messages.append({"role": "user", "content": f"{INSTRUCTION}\n\n{example.question}"})
        messages.append({"role": "assistant", "content": gold_solution(example)})
    messages.append({"role": "user", "content": f"{INSTRUCTION}\n\n{question}"})
    return messages


def build_prompt(tokenizer: PreTrainedTokenizerBase, question: str, exemplars: Sequence[Problem] = ()) -> str:
    """The prompt text for one question, through the chat template when the tokenizer has one."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            build_messages(question, exemplars), tokenize=False, add_generation_prompt=True
        )
    shots = "".join(f"Question: {e.question}\nAnswer: {gold_solution(e)}\n\n" for e in exemplars)
    return f"{INSTRUCTION}\n\n{shots}Question: {question}\nAnswer:"


def stop_strings(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Where to cut generations: chat models stop at their end-of-turn token instead."""
    return () if uses_chat_template(tokenizer) else PLAIN_STOP_STRINGS


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    # A rendered chat template already holds its special tokens; plain text gets the usual BOS.
    return list(tokenizer(prompt, add_special_tokens=not uses_chat_template(tokenizer))["input_ids"])


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> BatchEncoding:
    """Left-padded batch of prompts, tokenized exactly as `encode_solution` tokenizes its prompt part."""
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: needs a pad token for batching (use loading.prepare_tokenizer)")
    features = [{"input_ids": _prompt_ids(tokenizer, prompt)} for prompt in prompts]
    padded = collate_left(features, tokenizer.pad_token_id)
    return BatchEncoding({"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]})


def _answer_suffix(tokenizer: PreTrainedTokenizerBase, question: str, solution: str, exemplars: Sequence[Problem]) -> str:
    """The solution followed by whatever closes the assistant turn (``<|im_end|>``, EOS, ...)."""
    if uses_chat_template(tokenizer):
        messages = build_messages(question, exemplars)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": solution}], tokenize=False
        )
        if full.startswith(prompt) and full[len(prompt) :].startswith(solution):
            return full[len(prompt) :]
    return (solution if uses_chat_template(tokenizer) else " " + solution) + (tokenizer.eos_token or "")


def encode_solution(
    tokenizer: PreTrainedTokenizerBase,
    problem: Problem,
    max_length: int,
    exemplars: Sequence[Problem] = (),
    use_offset_mapping: bool = True,
) -> dict[str, torch.Tensor]:
    """Prompt + gold solution as one sequence with the prompt masked out of the labels.

    Returns 1-D ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt tokens) and
    ``reasoning_mask`` (True on reasoning tokens of the solution, for `ChainOfThoughtNLL`). Sequences
    longer than `max_length` lose the end of the solution, never the prompt.
    """
    prompt_ids = _prompt_ids(tokenizer, build_prompt(tokenizer, problem.question, exemplars))
    if max_length <= len(prompt_ids):
        raise ValueError(f"max_length: {max_length} leaves no room for the solution after a {len(prompt_ids)}-token prompt")
    solution = gold_solution(problem)
    suffix = _answer_suffix(tokenizer, problem.question, solution, exemplars)
    suffix_ids, offsets = token_offsets(tokenizer, suffix, use_offset_mapping)
    # Only the solution's own characters are classified; the closing template tokens are "other".
    start = suffix.index(solution)
    reasoning = classify_tokens(" " * start + solution + " " * (len(suffix) - start - len(solution)), offsets)
    suffix_ids, reasoning = suffix_ids[: max_length - len(prompt_ids)], reasoning[: max_length - len(prompt_ids)]
    input_ids = torch.tensor(prompt_ids + suffix_ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "reasoning_mask": torch.tensor([False] * len(prompt_ids) + reasoning, dtype=torch.bool),
    }


def solution_lengths(tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]) -> list[tuple[int, int]]:
    """(prompt tokens, solution tokens) of each problem as `encode_solution` would lay it out (before its cut):
    what a `max_length` keeps of the text a model learns from."""
    prompts = [_prompt_ids(tokenizer, build_prompt(tokenizer, p.question)) for p in problems]
    suffixes = tokenizer([gold_solution(p) for p in problems], add_special_tokens=False)["input_ids"]
    return [(len(prompt), len(suffix) + 1) for prompt, suffix in zip(prompts, suffixes)]  # + the end-of-turn token


def warn_if_cut(tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], max_length: int, field: str,
                option: str = "max_length") -> None:
    """Warn when `max_length` cuts the end off the solutions a model calibrates or recovers on: the end is where
    the last steps and the final answer are (Qwen2.5-Coder-0.5B's own GSM8K traces keep 35 % of their written
    steps in 256 tokens, and self calibration in such a window loses the arithmetic: README, "Calibration source")."""
    lengths = solution_lengths(tokenizer, problems)
    cut = [(prompt, solution) for prompt, solution in lengths if prompt + solution > max_length]
    lost = sum(prompt + solution - max_length for prompt, solution in cut) / max(1, sum(solution for _, solution in lengths))
    if lost > 0.01:  # a few long gold solutions losing their last tokens is not worth a warning
        warnings.warn(
            f"{field}: {option}={max_length} cuts the end off {len(cut)} of {len(lengths)} solutions ({lost:.0%} of "
            f"their tokens, final answers included); {option}={max(p + s for p, s in cut)} keeps them whole"
        )


_PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX, "reasoning_mask": False}


def collate_left(features: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack variable-length sequences padded on the left, as decoder-only generation wants.

    Missing ``attention_mask`` is ones; every other key is padded with its neutral value (labels -100).
    """
    if not features:
        raise ValueError("features: need at least one sequence to collate")
    length = max(len(f["input_ids"]) for f in features)
    batch: dict[str, list[torch.Tensor]] = {}
    for feature in features:
        ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        columns = {"attention_mask": torch.ones_like(ids), **{k: torch.as_tensor(v) for k, v in feature.items()}}
        for key, value in columns.items():
            fill = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
            pad = torch.full((length - len(value),), fill, dtype=value.dtype)
            batch.setdefault(key, []).append(torch.cat([pad, value]))
    return {key: torch.stack(values) for key, values in batch.items()}
