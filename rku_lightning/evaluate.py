"""Evaluate a causal LM's math reasoning: greedy answers, CoT NLL by token class, text perplexity.

`evaluate_model` is the reusable entry point (benchmark, Lightning callback); ``python -m
rku_lightning.evaluate`` is the command line. Outputs are written atomically: a JSON report with every
metric, the model source, the data file (path, sha256) and the indices evaluated, and a JSONL file
with one line per question saying what the model wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import TASKS, Problem, load_problems
from .files import write_text_atomic
from .generation import DEFAULT_MAX_NEW_TOKENS, iter_generations
from .metrics import (
    IGNORE_INDEX,
    ReasoningAccuracy,
    TextPerplexity,
    answers_match,
    extract_answer,
    sequence_nll,
    summarise_nll,
)
from .prompts import build_prompt, collate_left, encode_solution, select_exemplars

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRUNED_MARKER = "pruning.json"


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
        accuracy = ReasoningAccuracy()
        prompts = [build_prompt(tokenizer, p.question, exemplars) for p in problems]
        started, done = time.perf_counter(), 0
        for texts, lengths in iter_generations(model, tokenizer, prompts, batch_size, max_new_tokens, progress):
            chunk = problems[done : done + len(texts)]
            accuracy.update(texts, [p.answer for p in chunk], lengths)
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
        metrics.update({key: _number(value) for key, value in accuracy.compute().items()})
        metrics["generation_s"] = round(seconds, 2)
        metrics["generated_tokens_per_s"] = round(int(accuracy.tokens) / seconds, 2) if seconds > 0 else None
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


def default_data(task: str) -> Path:
    """The shared copy of the task's test set (``RKU_SHARED_DATA`` points at the data folder)."""
    if task == "jsonl":
        raise ValueError("data: --task jsonl has no default data file; pass --data PATH_OR_HUB_ID")
    folder = Path(os.environ.get("RKU_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    return folder / task / "test.jsonl"


def load_model(source: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A pruned export folder (it holds pruning.json) through `load_pruned`, anything else through `load_causal_lm`."""
    if (Path(source) / PRUNED_MARKER).is_file():
        from .export import load_pruned

        return load_pruned(source, dtype=dtype)
    from .loading import load_causal_lm

    return load_causal_lm(source, dtype=dtype)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rku_lightning.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub id, local folder, .gguf, embedded:NAME or a pruned export folder")
    parser.add_argument("--task", choices=TASKS, default="gsm8k")
    parser.add_argument("--data", help="JSONL file, folder with {split}.jsonl, or datasets hub id (default: shared test set)")
    parser.add_argument("--split", help="split of a folder or hub dataset (default: test)")
    parser.add_argument("--question-field")
    parser.add_argument("--answer-field")
    parser.add_argument("--solution-field")
    parser.add_argument("--limit", type=int, help="evaluate the first N problems")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--few-shot", type=int, default=0, help="number of solved exemplars in each prompt")
    parser.add_argument("--few-shot-data", help="where exemplars come from (default: the train split beside --data)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the exemplar draw")
    parser.add_argument("--no-generate", action="store_true", help="skip generation (NLL and perplexity only)")
    parser.add_argument("--no-nll", action="store_true", help="skip CoT NLL and perplexity")
    parser.add_argument("--max-length", type=int, default=1024, help="token limit of scored sequences")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--json", required=True, type=Path, help="report file; predictions go beside it as .predictions.jsonl")
    parser.add_argument("--threads", type=int, help="torch CPU threads (fewer than cores avoids oversubscription)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _predictions_path(report: Path) -> Path:
    return report.with_name(report.stem + ".predictions.jsonl")


def _print_table(metrics: dict) -> None:
    width = max(len(key) for key in metrics)
    print(f"{'metric':<{width}}  value")
    for key, value in metrics.items():
        shown = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"{key:<{width}}  {shown}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("limit", "batch_size", "max_new_tokens", "max_length", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: must be a positive integer, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or str(default_data(args.task))
    fields = dict(question_field=args.question_field, answer_field=args.answer_field, solution_field=args.solution_field)
    problems = load_problems(data, args.task, split=args.split, limit=args.limit, **fields)
    exemplars: list[Problem] = []
    if args.few_shot:
        pool_source = args.few_shot_data or (
            str(Path(problems.path).with_name("train.jsonl")) if problems.path else data
        )
        pool = load_problems(pool_source, args.task, split="train", **fields)
        exemplars = select_exemplars(pool.problems, args.few_shot, args.seed, exclude=problems.problems)

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    load_s = time.perf_counter() - started
    result = evaluate_model(
        model,
        tokenizer,
        problems.problems,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        exemplars=exemplars,
        generate=not args.no_generate,
        nll=not args.no_nll,
        max_length=args.max_length,
        progress=not args.no_progress,
    )
    predictions_path = _predictions_path(args.json)
    report = {
        "model": args.model,
        "task": args.task,
        "data": problems.provenance(),
        "indices": [p.index for p in problems],
        "skipped_records": problems.skipped,
        "settings": {
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "max_length": args.max_length,
            "few_shot": args.few_shot,
            "few_shot_indices": [e.index for e in exemplars],
            "seed": args.seed,
            "dtype": args.dtype,
            "decoding": "greedy",
        },
        "metrics": result["metrics"],
        "predictions_file": predictions_path.name,
        "model_load_s": round(load_s, 2),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "threads": torch.get_num_threads(),
        },
        "command": "python -m rku_lightning.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if result["predictions"]:
        write_text_atomic(predictions_path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result["predictions"]))
    else:
        report["predictions_file"] = None
    write_text_atomic(args.json, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _print_table(result["metrics"])
    print(f"report: {args.json}" + (f"\npredictions: {predictions_path}" if result["predictions"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
