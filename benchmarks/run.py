"""The benchmark's one entry point: run a stage's missing rows, each in its own process, then render.

    python -m benchmarks.run oneshot --models qwen0.5b --sparsities 0.2 0.3 0.4 --allocations global uniform
    python -m benchmarks.run recover --methods rku flap --preset cpu
    python -m benchmarks.run render

Rows whose JSON exists (for one-shot rows: measured with the same settings) are skipped, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rku_lightning.pruning.settings import ALLOCATIONS

from . import oneshot, recover
from .common import ROOT, is_done


def _ordered_rows(args: argparse.Namespace) -> list[oneshot.Row]:
    """The grid's rows; with --methods, only those methods (and dense), in the order given."""
    rows = oneshot.grid(args.models, args.sparsities, args.allocations)
    if not args.methods:
        return rows
    rank = {name: i for i, name in enumerate(args.methods)}
    chosen = [r for r in rows if r.method in rank]
    return sorted(chosen, key=lambda r: (rank[r.method], r.model, r.allocation, r.sparsity))


def _run_module(module: str, flags: list[str], name: str, label: str) -> bool:
    """One row in its own process, so that rows never share state."""
    print(f"{label} {name}: running", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT)
    status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
    print(f"{label} {name}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
    return result.returncode == 0


def run_oneshot(args: argparse.Namespace) -> int:
    rows = _ordered_rows(args)
    settings = oneshot.settings_from(args)
    flags = oneshot.settings_flags(settings)
    todo = [(i, r) for i, r in enumerate(rows, 1) if not oneshot.measured_with(settings.stage, r.row_id, settings)]
    print(f"{len(rows) - len(todo)} of {len(rows)} rows done already; running {len(todo)} with {args.jobs} job(s)", flush=True)
    # Rows are separate processes; with --jobs 2 on 2 cores each should use one thread (--threads 1).
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(
            pool.map(lambda item: _run_module("benchmarks.oneshot", ["--row", item[1].row_id, *flags], item[1].row_id, f"[{item[0]}/{len(rows)}]"), todo)
        )
    return sum(not ok for ok in results)


def run_recover(args: argparse.Namespace) -> int:
    """Prune-and-recover rows one after another (each is a whole train.py run using every thread given)."""
    failed = 0
    for i, method in enumerate(args.methods, 1):
        rid = recover.row_id(method, args.preset)
        if is_done(recover.STAGE, rid):
            print(f"[{i}/{len(args.methods)}] {rid}: done already", flush=True)
            continue
        flags = [f"--method={method}", f"--preset={args.preset}", f"--threads={args.threads}"]
        ok = _run_module("benchmarks.recover", flags, rid, f"[{i}/{len(args.methods)}]")
        failed += not ok
    return failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    one = stages.add_parser("oneshot", help="one-shot quality rows (no recovery)")
    one.add_argument("--models", nargs="+", default=["qwen0.5b"], choices=["qwen0.5b", "smollm2"])
    one.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.3, 0.4])
    one.add_argument("--allocations", nargs="+", default=["global", "uniform"], choices=ALLOCATIONS)
    one.add_argument("--methods", nargs="*", help="method names as in row ids, in the order to run them (dense, rku, rku_hidden, ...)")
    one.add_argument("--jobs", type=int, default=1, help="rows to run at once, each in its own process")
    oneshot.add_settings_arguments(one)
    rec = stages.add_parser("recover", help="prune-and-recover rows (train.py with LoRA recovery), one per method")
    rec.add_argument("--methods", nargs="+", default=["rku", "flap"], help="importances, in the order to run them")
    rec.add_argument("--preset", choices=sorted(recover.PRESETS), default="cpu")
    rec.add_argument("--threads", type=int, default=2)
    stages.add_parser("render", help="write benchmarks/RESULTS.md and its plots from the saved rows")
    args = parser.parse_args(argv)
    if args.stage in ("oneshot", "recover"):
        sys.exit(1 if (run_oneshot if args.stage == "oneshot" else run_recover)(args) else 0)
    from .render import render

    print(render())


if __name__ == "__main__":
    main()
