"""The benchmark's one entry point: run a stage's missing rows, each in its own process, then render.

    python -m benchmarks.run oneshot --models qwen0.5b --sparsities 0.2 0.3 0.4 --allocations global uniform
    python -m benchmarks.run render

Rows whose JSON exists are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import asdict

from . import oneshot
from .common import ROOT, is_done


def run_oneshot(args: argparse.Namespace) -> int:
    rows = oneshot.grid(args.models, args.sparsities, args.allocations)
    if args.methods:
        rows = [r for r in rows if r.importance is None or r.row_id.split("-")[1] in args.methods]
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(oneshot.settings_from(args)).items()]
    failures = 0
    for number, row in enumerate(rows, 1):
        if is_done(oneshot.STAGE, row.row_id):
            print(f"[{number}/{len(rows)}] {row.row_id}: done, skipped", flush=True)
            continue
        print(f"[{number}/{len(rows)}] {row.row_id}: running", flush=True)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "benchmarks.oneshot", "--row", row.row_id, *settings], cwd=ROOT)
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        failures += result.returncode != 0
        print(f"[{number}/{len(rows)}] {row.row_id}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
    return failures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    one = stages.add_parser("oneshot", help="one-shot quality rows (no recovery)")
    one.add_argument("--models", nargs="+", default=["qwen0.5b"], choices=["qwen0.5b", "smollm2"])
    one.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.3, 0.4])
    one.add_argument("--allocations", nargs="+", default=["global", "uniform"], choices=["global", "uniform"])
    one.add_argument("--methods", nargs="*", help="method names as in row ids (rku, rku_hidden, kinetic, taylor, ...)")
    oneshot.add_settings_arguments(one)
    stages.add_parser("render", help="write benchmarks/RESULTS.md and its plots from the saved rows")
    args = parser.parse_args(argv)
    if args.stage == "oneshot":
        sys.exit(1 if run_oneshot(args) else 0)
    from .render import render

    print(render())


if __name__ == "__main__":
    main()
