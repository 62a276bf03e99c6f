"""Calibration batches from a problem set: prompt + chain of thought (labels on the solution only), or
questions only for the label-free `hidden` objective. One fixed, seeded sample, so runs are comparable.

The chain of thought is the data set's gold solution (`gold`) or the model's own greedy answer
(`self`, `self_calibration_problems`): RESP (arXiv 2512.02185) measured that scoring on the model's
own reasoning, with gradients from the generated tokens only, is what keeps GSM8K at 40 % sparsity.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rku_lightning.checks import positive_int

from .data import Problem
from .prompts import build_prompt, collate_left, encode_prompts, encode_solution, warn_if_cut
from .traces import Trace, TraceFilter, as_problems, cached_traces

CALIBRATION_SOURCES: tuple[str, ...] = ("gold", "self")


def sample_problems(problems: Sequence[Problem], samples: int, seed: int = 0) -> list[Problem]:
    """A seeded sample of `samples` problems in source order (all of them, with a warning, if there are fewer)."""
    positive_int("samples", samples)
    if samples > len(problems):
        warnings.warn(f"samples={samples} but the calibration set has {len(problems)} problems: using all {len(problems)}", stacklevel=2)
    chosen = sorted(random.Random(seed).sample(range(len(problems)), min(samples, len(problems))))
    return [problems[i] for i in chosen]


def warn_if_calibration_cut(
    tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], samples: int, max_length: int, seed: int, field: str,
    option: str = "max_length",
) -> None:
    """`warn_if_cut` on the sample `calibration_batches` will take, before any compute (the short-set warning is
    left to `calibration_batches`)."""
    warn_if_cut(tokenizer, sample_problems(problems, min(samples, len(problems)), seed), max_length, field, option)


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    samples: int = 32,
    batch_size: int = 4,
    max_length: int = 384,
    questions_only: bool = False,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches of input_ids / attention_mask (and labels unless `questions_only`)."""
    chosen = sample_problems(problems, samples, seed)
    batches = []
    for start in range(0, len(chosen), batch_size):
        chunk = chosen[start : start + batch_size]
        if questions_only:
            encoded = encode_prompts(tokenizer, [build_prompt(tokenizer, p.question) for p in chunk])
            batch = {k: v[:, -max_length:] for k, v in encoded.items()}
        else:
            features = [encode_solution(tokenizer, p, max_length) for p in chunk]
            batch = collate_left(features, tokenizer.pad_token_id)
            batch.pop("reasoning_mask", None)
        batches.append(batch)
    return batches


def mixed_calibration_problems(problems: Sequence[Problem], traces: Sequence[Trace], keep: TraceFilter = "all") -> list[Problem]:
    """`problems` (a calibration sample, in order) with every second one's gold solution replaced by its model trace.

    `traces` are the traces of `problems[1::2]`. Why: calibrated on gold text RKU keeps the arithmetic and loses the
    prose that carries an answer to its end, on the dense model's traces the reverse (README, "KD recovery with RKU
    calibrated on gold text"); half of each, on the same questions' count, asks whether one sample keeps both.
    `keep="correct"` drops the wrong traces (the gold half stays).
    """
    if [t.index for t in traces] != [p.index for p in problems[1::2]]:
        raise ValueError("traces: need one trace for each of problems[1::2], in their order")
    traced = {p.index: p for p in as_problems(traces, keep)}
    return [p if i % 2 == 0 else traced[p.index] for i, p in enumerate(problems) if i % 2 == 0 or p.index in traced]


def self_calibration_problems(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    samples: int,
    seed: int = 0,
    keep: TraceFilter = "all",
    max_new_tokens: int = 320,
    batch_size: int = 8,
    folder: str | Path | None = None,
    progress: bool = True,
) -> tuple[list[Problem], dict]:
    """The seeded calibration sample with the model's own (cached) traces as solutions, and the cache record."""
    traces, record = cached_traces(
        model, tokenizer, sample_problems(problems, samples, seed), max_new_tokens, batch_size, folder, progress
    )
    return as_problems(traces, keep), record
