"""The model's own chains of thought ("traces"): greedy answers to training questions, cached on disk.

Recovery and calibration on gold GSM8K solutions teach the dataset's format (`<<a*b=c>>`, `#### N`)
rather than the arithmetic (README, Results); the literature recovers reasoning from the dense model's
*own* answers instead (docs/method.md). A trace is the dense (or current) model's greedy answer to one
question, with its extracted answer and whether it matches the gold one. `as_problems` turns traces
into `Problem`s whose solution is the trace, so every encoder (`encode_solution`: prompt masked,
labels on the generated tokens only) and loader works on them unchanged.

Traces are cached under `$RKU_CACHE/traces/` keyed by everything they depend on: the weights (a
digest of every parameter), the questions, the rendered prompt, the decoding budget and batch size,
and the device type. The cache holds every trace; filtering (`keep="correct"`) happens on read, so one
generation serves both filters.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rku_lightning.files import write_text_atomic
from rku_lightning.paths import cache_dir

from .data import Problem
from .generation import DEFAULT_MAX_NEW_TOKENS, iter_generations
from .metrics import score_answer
from .prompts import build_prompt

TraceFilter = Literal["all", "correct"]
TRACE_FILTERS: tuple[str, ...] = ("all", "correct")
#: Gathers one picklable object per rank into a list ordered by rank (e.g. `torch.distributed.all_gather_object`).
Gather = Callable[[list], list[list]]


@dataclass(frozen=True)
class Trace:
    """One greedy answer: what the model wrote for problem `index`, and whether its final answer is right."""

    index: int
    question: str
    gold_answer: float
    text: str
    extracted: float | None
    correct: bool
    tokens: int


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): which weights generated a trace.

    LoRA adapters with a zero B matrix do not change the model's outputs but would change the digest, so
    their parameters are left out and the wrapped weights keep their plain names (traces are made
    before recovery trains the adapters).
    """
    digest = hashlib.sha256()
    named = {name.replace(".base_layer.", "."): t for name, t in model.state_dict().items() if "lora_" not in name}
    for name, tensor in sorted(named.items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def trace_key(
    digest: str,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    max_new_tokens: int,
    batch_size: int,
    device_type: str,
) -> dict:
    """What a set of traces depends on; its sha256 names the cache file."""
    questions = hashlib.sha256(
        json.dumps([[p.index, p.question, p.answer] for p in problems], ensure_ascii=False).encode()
    ).hexdigest()
    return {
        "model": digest,
        "questions": questions,
        "num_questions": len(problems),
        "prompt": build_prompt(tokenizer, "{question}"),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "device": device_type,
        "decoding": "greedy",
    }


def generate_traces(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
) -> list[Trace]:
    """Greedy answers of `model` to `problems`, in their order, with a progress bar.

    With `world_size > 1` every rank generates its shard (problems rank, rank + W, ...) and `gather`
    collects the shards, so that all ranks return the same full list.
    """
    if world_size > 1 and gather is None:
        raise ValueError("gather: several ranks need a way to collect each other's traces")
    mine = list(problems[rank::world_size])
    prompts = [build_prompt(tokenizer, p.question) for p in mine]
    traces: list[Trace] = []
    for texts, lengths in iter_generations(model, tokenizer, prompts, batch_size, max_new_tokens, progress):
        for problem, text, length in zip(mine[len(traces) :], texts, lengths):
            extracted, correct = score_answer(text, problem.answer)
            traces.append(Trace(problem.index, problem.question, problem.answer, text, extracted, correct, int(length)))
    if world_size == 1:
        return traces
    position = {p.index: i for i, p in enumerate(problems)}
    return sorted((t for shard in gather(traces) for t in shard), key=lambda t: position[t.index])


def cached_traces(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    folder: str | Path | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
) -> tuple[list[Trace], dict]:
    """`generate_traces` through the cache: a hit reads the file, a miss generates and rank 0 writes it.

    Returns the traces and a record of the lookup (key, path, hit, seconds) for the run's report.
    """
    if not problems:
        raise ValueError("problems: need at least one question to generate traces for")
    started = time.perf_counter()
    device = next(model.parameters()).device
    key = trace_key(model_digest(model), tokenizer, problems, max_new_tokens, batch_size, device.type)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = Path(folder) if folder is not None else cache_dir() / "traces"
    path = path / f"{name}.json"
    hit = path.is_file()
    if hit:
        stored = json.loads(path.read_text(encoding="utf-8"))
        traces = [Trace(**t) for t in stored["traces"]]
    else:
        traces = generate_traces(model, tokenizer, problems, max_new_tokens, batch_size, progress, rank, world_size, gather)
        if rank == 0:
            payload = {"key": key, "traces": [asdict(t) for t in traces]}
            write_text_atomic(path, json.dumps(payload, ensure_ascii=False) + "\n")
    record = {
        "key": key,
        "path": str(path),
        "hit": hit,
        "seconds": round(time.perf_counter() - started, 2),
        **trace_counts(traces, max_new_tokens),
    }
    return traces, record


def trace_counts(traces: Sequence[Trace], max_new_tokens: int) -> dict[str, int]:
    """How many traces, how many end in the right answer, how many the token budget stopped (no final answer)."""
    return {
        "traces": len(traces),
        "correct": sum(t.correct for t in traces),
        "stopped": sum(t.tokens >= max_new_tokens for t in traces),
    }


def as_problems(traces: Sequence[Trace], keep: TraceFilter = "all") -> list[Problem]:
    """Traces as problems whose solution is the trace: all of them, or only those with the right answer.

    An empty trace stays (the model's answer was to stop at once): its end-of-turn token is still what
    the dense model predicts there.
    """
    if keep not in TRACE_FILTERS:
        raise ValueError(f"keep must be one of {TRACE_FILTERS}, got {keep!r}")
    kept = [t for t in traces if keep == "all" or t.correct]
    if not kept:
        raise ValueError(
            f"traces: keep={keep!r} left none of the {len(traces)} traces (none has the right answer); "
            "use trace_keep='all' or more questions"
        )
    return [Problem(question=t.question, solution=t.text, answer=t.gold_answer, index=t.index) for t in kept]
