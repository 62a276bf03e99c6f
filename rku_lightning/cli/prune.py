"""One-shot pruning without training: load, calibrate, prune, compact, export, and print a summary.

    python -m rku_lightning.cli.prune --model embedded:qwen2.5-coder-0.5b-instruct --sparsity 0.4 \\
        --importance rku --allocation global --calibration ../shared/data/gsm8k/train.jsonl \\
        --samples 128 --out outputs/qwen-rku-40
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rku_lightning.evaluation.calibration import calibration_batches
from rku_lightning.evaluation.data import load_problems
from rku_lightning.loading import load_causal_lm
from rku_lightning.paths import task_file
from rku_lightning.pruning.compaction import compact
from rku_lightning.pruning.export import EXPORT_FORMATS, save_pruned
from rku_lightning.pruning.gguf import GGUF_TYPES
from rku_lightning.pruning.importance import IMPORTANCES
from rku_lightning.pruning.objectives import OBJECTIVES
from rku_lightning.pruning.pruner import ALLOCATIONS, ATTENTION_MODES, StructuredPruner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rku_lightning.cli.prune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id, folder, .gguf file, embedded:NAME or a pruned export (pruned again)")
    parser.add_argument("--sparsity", type=float, required=True, help="fraction of decoder-layer parameters to remove, in [0, 1)")
    parser.add_argument("--importance", default="rku", choices=sorted(IMPORTANCES))
    parser.add_argument("--allocation", default="global", choices=ALLOCATIONS)
    parser.add_argument("--objective", default="ce", choices=sorted(OBJECTIVES))
    parser.add_argument("--attention", default="groups", choices=ATTENTION_MODES)
    parser.add_argument("--min-mlp-keep", type=float, default=0.1)
    parser.add_argument("--calibration", default=str(task_file("gsm8k", "train")), help="GSM8K-style JSONL path or hub id")
    parser.add_argument("--calibration-task", default="gsm8k", choices=("gsm8k", "svamp", "jsonl"))
    parser.add_argument(
        "--samples", type=int, default=128,
        help="calibration problems (a fixed seeded sample); global allocation ranks across layers and was "
        "measured to need 64-128 (README, Results)",
    )
    parser.add_argument("--max-length", type=int, default=384, help="tokens per calibration sequence")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="export folder, or .gguf file with --format gguf (written atomically)")
    parser.add_argument(
        "--format", default="safetensors", choices=EXPORT_FORMATS,
        help="safetensors: a folder for transformers/load_causal_lm; gguf: one file for llama.cpp (README, GGUF)",
    )
    parser.add_argument("--gguf-dtype", default="f16", choices=sorted(GGUF_TYPES), help="weight type of --format gguf")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if not 0 <= args.sparsity < 1:
        raise SystemExit(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if Path(args.out).exists() and not args.overwrite:
        raise SystemExit(f"--out {args.out} already exists; choose a new folder or pass --overwrite")
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model, dtype=getattr(torch, args.dtype))
    model.to(args.device)
    pruner = StructuredPruner(
        model,
        importance=args.importance,
        allocation=args.allocation,
        objective=args.objective,
        attention=args.attention,
        min_mlp_keep=args.min_mlp_keep,
        seed=args.seed,
    )
    if pruner.importance.needs_calibration:
        problems = load_problems(args.calibration, task=args.calibration_task, split="train")
        batches = calibration_batches(
            tokenizer, problems, args.samples, args.batch_size, args.max_length,
            questions_only=args.objective == "hidden", seed=args.seed,
        )
        pruner.calibrate(batches)
    report = pruner.prune(args.sparsity)
    compact(model)
    metadata = {
        "cli": vars(args),
        "source_model": args.model,
        "seconds": round(time.perf_counter() - started, 1),
        "report": report.to_dict(),
    }
    save_pruned(model, tokenizer, args.out, overwrite=args.overwrite, metadata=metadata, format=args.format,
                gguf_dtype=args.gguf_dtype)
    print(report.summary())
    print(f"saved to {args.out} in {metadata['seconds']} s")
    return report.to_dict()


if __name__ == "__main__":
    main()
