"""``python -m rku_lightning.cli.evaluate``: the reasoning metrics of one model, as a JSON report and a JSONL file.

Outputs are written atomically: a JSON report with every metric, the model source, the data file
(path, sha256) and the indices evaluated, and a JSONL file with one line per question saying what
the model wrote.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rku_lightning.cli.errors import DEBUG_HELP, OneLineParser, UsageError, run_cli
from rku_lightning.evaluation.data import TASKS, Problem, load_problems
from rku_lightning.evaluation.evaluate import evaluate_model, kl_to_reference
from rku_lightning.evaluation.generation import DEFAULT_MAX_NEW_TOKENS
from rku_lightning.evaluation.prompts import select_exemplars
from rku_lightning.evaluation.traces import as_problems, cached_traces
from rku_lightning.files import check_can_create, write_text_atomic
from rku_lightning.loading import DTYPES, load_causal_lm
from rku_lightning.paths import task_file


def default_data(task: str) -> Path:
    """The shared copy of the task's test set (``RKU_SHARED_DATA`` points at the data folder)."""
    if task == "jsonl":
        raise ValueError("data: --task jsonl has no default data file; pass --data PATH_OR_HUB_ID")
    return task_file(task, "test")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m rku_lightning.cli.evaluate", description=__doc__.splitlines()[0])
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
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument(
        "--reference-model",
        help="dense model to measure fidelity against: adds kl_to_reference (teacher-forced KL(reference || model) "
        "per token on the reference's own cached answers) and kl_to_reference_gold (on the gold solutions)",
    )
    parser.add_argument("--json", required=True, type=Path, help="report file; predictions go beside it as .predictions.jsonl")
    parser.add_argument("--threads", type=int, help="torch CPU threads (fewer than cores avoids oversubscription)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def _check_outputs(report: Path) -> None:
    """The report and predictions paths must be writable files before the run, not after it."""
    for path in (report, _predictions_path(report)):
        if path.is_dir():
            raise UsageError(f"--json: {path} is a folder; pass a file path such as {path / 'report.json'}")
        try:
            check_can_create(path, "--json")
        except OSError as error:
            raise UsageError(str(error)) from None


def _write_outputs(report_path: Path, report: dict, predictions: list[dict]) -> None:
    """Predictions first, then the report that names them; a failed report takes its predictions with it."""
    predictions_path = _predictions_path(report_path)
    if predictions:
        write_text_atomic(predictions_path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    try:
        write_text_atomic(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    except BaseException:
        if predictions:
            predictions_path.unlink(missing_ok=True)
        raise


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
            raise UsageError(f"--{name.replace('_', '-')}: must be a positive integer, got {value}")
    _check_outputs(args.json)
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
    model, tokenizer = load_causal_lm(args.model, DTYPES[args.dtype])
    load_s = time.perf_counter() - started
    reference, trace_record = None, None
    if args.reference_model:
        reference, reference_tokenizer = load_causal_lm(args.reference_model, DTYPES[args.dtype])
        if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UsageError("--reference-model: its tokenizer differs from --model's; KL needs the same vocabulary")
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
    if reference is not None:
        progress = not args.no_progress
        traces, trace_record = cached_traces(reference, tokenizer, problems.problems, args.max_new_tokens, args.batch_size,
                                             progress=progress)
        result["metrics"]["kl_to_reference"] = kl_to_reference(
            model, reference, tokenizer, as_problems(traces), batch_size=args.batch_size, max_length=args.max_length, progress=progress
        )
        result["metrics"]["kl_to_reference_gold"] = kl_to_reference(
            model, reference, tokenizer, [p for p in problems if p.solution], batch_size=args.batch_size, max_length=args.max_length,
            progress=progress,
        )
    predictions_path = _predictions_path(args.json)
    report = {
        "model": args.model,
        "reference_model": args.reference_model,
        "reference_traces": trace_record,
        "task": args.task,
        "data": problems.provenance(),
        "problems": len(problems),
        "indices": [p.index for p in problems],
        "skipped_records": problems.skipped,
        "settings": {
            "limit": args.limit,
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
        "command": "python -m rku_lightning.cli.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if not result["predictions"]:
        report["predictions_file"] = None
    _write_outputs(args.json, report, result["predictions"])
    _print_table(result["metrics"])
    print(f"report: {args.json}" + (f"\npredictions: {predictions_path}" if result["predictions"] else ""))
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """The command: `main` with one-line errors and exit statuses (see `rku_lightning.cli.errors`)."""
    return run_cli(main, _parser().prog, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
