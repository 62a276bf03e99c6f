"""One-shot pruning without training: load, calibrate, prune, compact, export, and print a summary.

    python -m rku_lightning.cli.prune --model embedded:qwen2.5-coder-0.5b-instruct --sparsity 0.4 \\
        --importance rku --allocation global --calibration ../shared/data/gsm8k/train.jsonl \\
        --samples 128 --out outputs/qwen-rku-40
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterable

import torch

from rku_lightning.checks import fraction
from rku_lightning.cli.errors import DEBUG_HELP, OneLineParser, UsageError, run_cli
from rku_lightning.evaluation.calibration import (
    CALIBRATION_SOURCES,
    calibration_batches,
    self_calibration_problems,
    warn_if_calibration_cut,
)
from rku_lightning.evaluation.data import load_problems
from rku_lightning.evaluation.traces import TRACE_FILTERS
from rku_lightning.loading import DTYPES, load_causal_lm
from rku_lightning.paths import task_file
from rku_lightning.pruning.compaction import compact
from rku_lightning.pruning.export import EXPORT_FORMATS, check_export_target, save_pruned
from rku_lightning.pruning.gguf import GGUF_TYPES
from rku_lightning.pruning.importance import IMPORTANCES
from rku_lightning.pruning.objectives import OBJECTIVES
from rku_lightning.pruning.pruner import StructuredPruner
from rku_lightning.pruning.settings import ALLOCATIONS, ATTENTION_MODES, PruningSettings


def _choices(values: Iterable[str]) -> str:
    """Choices shown in --help; PruningSettings checks them, so that the CLI refuses with the callback's message."""
    return "{" + ",".join(values) + "}"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m rku_lightning.cli.prune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id, folder, .gguf file, embedded:NAME or a pruned export (pruned again)")
    parser.add_argument("--sparsity", type=float, required=True, help="fraction of decoder-layer parameters to remove, in [0, 1)")
    parser.add_argument("--importance", default="rku", metavar=_choices(sorted(IMPORTANCES)))
    parser.add_argument("--allocation", default="uniform", metavar=_choices(ALLOCATIONS))
    parser.add_argument("--objective", default="ce", metavar=_choices(OBJECTIVES))
    parser.add_argument("--attention", default="groups", metavar=_choices(ATTENTION_MODES))
    parser.add_argument("--min-mlp-keep", type=float, default=0.1)
    parser.add_argument("--micro-batch-size", type=int, help="split calibration batches to bound activation memory")
    parser.add_argument("--checkpoint-layers", action="store_true", help="recompute layer activations in backward (less memory)")
    parser.add_argument("--calibration", default=str(task_file("gsm8k", "train")), help="GSM8K-style JSONL path or hub id")
    parser.add_argument("--calibration-task", default="gsm8k", choices=("gsm8k", "svamp", "jsonl"))
    parser.add_argument(
        "--calibration-source", default="self", choices=CALIBRATION_SOURCES,
        help="chains of thought to score on: the model's own greedy answers (self, the default: one-shot it kept "
        "more answers than gold over two calibration samples, README 'Defaults'; generated once and cached under "
        "$RKU_CACHE/traces) or the data set's solutions (gold: no generation); unused by --objective hidden",
    )
    parser.add_argument("--trace-keep", default="all", choices=TRACE_FILTERS, help="self: keep all traces or only correct ones")
    parser.add_argument("--trace-max-new-tokens", type=int, default=320, help="self: token budget of each trace")
    parser.add_argument(
        "--samples", type=int, default=128,
        help="calibration problems (a fixed seeded sample); global allocation ranks across layers and was "
        "measured to need 64-128 (README, Results)",
    )
    parser.add_argument(
        "--max-length", type=int, default=640,
        help="tokens per calibration sequence: 640 holds a prompt and a whole 320-token trace (shorter windows "
        "score the openings only and were measured to lose)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample and of a named importance")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (fewer than cores avoids oversubscription)")
    parser.add_argument("--out", required=True, help="export folder, or .gguf file with --format gguf (written atomically)")
    parser.add_argument(
        "--format", default="safetensors", choices=EXPORT_FORMATS,
        help="safetensors: a folder for transformers/load_causal_lm; gguf: one file for llama.cpp (README, GGUF)",
    )
    parser.add_argument("--gguf-dtype", default="f16", choices=sorted(GGUF_TYPES), help="weight type of --format gguf")
    parser.add_argument("--overwrite", action="store_true", help="replace the export already in --out (only an export)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def check_arguments(args: argparse.Namespace) -> PruningSettings:
    """Every budget and output path, before the model is loaded; returns the validated settings."""
    try:
        fraction("--sparsity", args.sparsity)
        settings = PruningSettings(
            importance=args.importance,
            allocation=args.allocation,
            objective=args.objective,
            attention=args.attention,
            min_mlp_keep=args.min_mlp_keep,
            micro_batch_size=args.micro_batch_size,
            seed=args.seed,
            checkpoint_layers=args.checkpoint_layers,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    for name in ("samples", "batch_size", "max_length", "threads", "trace_max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    try:
        check_export_target(args.out, args.overwrite, args.format)
    except (OSError, ValueError) as error:
        raise UsageError(f"--out: {error}".replace("overwrite=True", "--overwrite")) from None
    if args.sparsity == 0:
        warnings.warn("--sparsity 0 removes nothing: the export will be the unpruned model", stacklevel=2)
    return settings


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    settings = check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    method = settings.build_importance()
    problems = None
    if method.needs_calibration:  # read (and check) the data before loading the model
        problems = load_problems(args.calibration, task=args.calibration_task, split="train").problems
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model, dtype=DTYPES[args.dtype])
    model.to(args.device)
    pruner = StructuredPruner.from_settings(model, settings)
    try:  # known right after loading, per pool of the chosen allocation (every layer, for uniform)
        pruner.check_reachable(args.sparsity, "--sparsity")
    except ValueError as error:
        raise UsageError(str(error).replace("min_mlp_keep", "--min-mlp-keep")) from None
    calibration = traces = None
    if problems is not None:
        questions_only = args.objective == "hidden"  # `hidden` calibrates on the questions alone: no answers read
        if args.calibration_source == "self" and not questions_only:
            problems, traces = self_calibration_problems(
                model, tokenizer, problems, args.samples, args.seed, args.trace_keep, args.trace_max_new_tokens, args.batch_size
            )
        if not questions_only:
            warn_if_calibration_cut(tokenizer, problems, args.samples, args.max_length, args.seed,
                                    f"--calibration-source {args.calibration_source}", "--max-length")
        batches = calibration_batches(
            tokenizer, problems, args.samples, args.batch_size, args.max_length, questions_only=questions_only, seed=args.seed,
        )
        calibration = {"requested_samples": args.samples, "samples": sum(len(b["input_ids"]) for b in batches)}
        pruner.calibrate(batches)
    report = pruner.prune(args.sparsity)
    compact(model)
    metadata = {
        "cli": vars(args),
        "calibration": calibration,
        "source_model": args.model,
        "seconds": round(time.perf_counter() - started, 1),
        "report": report.to_dict(),
        "traces": traces,
    }
    save_pruned(model, tokenizer, args.out, overwrite=args.overwrite, metadata=metadata, format=args.format,
                gguf_dtype=args.gguf_dtype)
    print(report.summary())
    print(f"saved to {args.out} in {metadata['seconds']} s")
    return report.to_dict()


def cli(argv: list[str] | None = None) -> int:
    """The command: `main` with one-line errors and exit statuses (see `rku_lightning.cli.errors`)."""
    return run_cli(main, build_parser().prog, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
