"""What every benchmark row shares: where its JSON lives, what it records, and atomic writes.

A row is one measurement made in its own process; its JSON holds the metrics plus the command,
commit, data hashes, timings and machine, so a reader can reproduce it. A rerun skips rows whose
JSON exists (delete it to measure again).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from rku_lightning.files import write_text_atomic
from rku_lightning.paths import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"  # git-ignored scratch: cached statistics, pruned exports
DATA = shared_data_dir()
MODELS = {"qwen0.5b": "embedded:qwen2.5-coder-0.5b-instruct", "smollm2": "embedded:smollm2-135m-instruct"}


def row_path(stage: str, row_id: str) -> Path:
    return RESULTS / stage / f"{row_id}.json"


def is_done(stage: str, row_id: str) -> bool:
    return row_path(stage, row_id).is_file()


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "rku_lightning"], cwd=ROOT, capture_output=True, text=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        # A copy of the tree without .git (a lent GPU machine) is told its commit by whoever copied it.
        return os.environ.get("RKU_COMMIT", "unknown")


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "machine": platform.machine(),
    }


def write_row(stage: str, row_id: str, record: dict) -> Path:
    """Write a row's JSON atomically, adding provenance that every row must carry."""
    path = row_path(stage, row_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {
        "stage": stage,
        "row_id": row_id,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        **record,
    }
    write_text_atomic(path, json.dumps(full, indent=2))
    return path


def load_rows(stage: str) -> list[dict]:
    folder = RESULTS / stage
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
