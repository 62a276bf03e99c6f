"""Inference speed of a model in this process: greedy decode and prefill tokens/s on a fixed prompt.

One implementation for the benchmark (`benchmarks/efficiency`) and the main job's summary. Ratios are
only meaningful between models measured side by side, so `compare_decode` interleaves its repetitions
and reports medians: on a shared machine another job slows whichever model is running, not one of them.
"""

from __future__ import annotations

import statistics
import time

import torch

#: The fixed prompt of every speed measurement (a GSM8K training question).
SPEED_PROMPT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Let's think step by step."
)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall time covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_ids(tokenizer, batch: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """The fixed prompt (tiled and cut to `length` tokens when given), repeated `batch` times."""
    ids = tokenizer(SPEED_PROMPT)["input_ids"]
    if length is not None:
        ids = (ids * (length // max(1, len(ids)) + 1))[:length]
    ids = torch.tensor([ids] * batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def decode_tokens_per_s(model, tokenizer, batch: int, new_tokens: int) -> float:
    """Greedy tokens generated per second (all sequences), prompt prefill included, length forced."""
    device = device_of(model)
    inputs = {k: v.to(device) for k, v in prompt_ids(tokenizer, batch).items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    synchronize(device)
    started = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    synchronize(device)
    seconds = time.perf_counter() - started
    return (out.shape[1] - inputs["input_ids"].shape[1]) * batch / seconds


@torch.inference_mode()
def prefill_tokens_per_s(model, tokenizer, batch: int, length: int) -> float:
    """Prompt tokens processed per second by one forward pass that fills the KV cache."""
    device = device_of(model)
    inputs = {k: v.to(device) for k, v in prompt_ids(tokenizer, batch, length).items()}
    synchronize(device)
    started = time.perf_counter()
    model(**inputs, use_cache=True)
    synchronize(device)
    return batch * length / (time.perf_counter() - started)


def compare_decode(models: dict[str, torch.nn.Module], tokenizer, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Batch-1 greedy decode tokens/s of each of `models` ({name: model}), measured in turns after a warm-up.

    Returns {name: {"median": tokens/s, "runs": [...]}} plus "settings".
    """
    if repeats < 1 or new_tokens < 1:
        raise ValueError(f"compare_decode: repeats and new_tokens must be >= 1, got {repeats} and {new_tokens}")
    for model in models.values():  # allocator and kernel warm-up, not recorded
        decode_tokens_per_s(model, tokenizer, 1, 2)
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(decode_tokens_per_s(model, tokenizer, 1, new_tokens))
    result: dict = {name: {"median": statistics.median(values), "runs": values} for name, values in runs.items()}
    result["settings"] = {"batch": 1, "new_tokens": new_tokens, "repeats": repeats, "interleaved": True, "greedy": True}
    return result
