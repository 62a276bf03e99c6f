"""Where the project's data and caches live: one resolver, so that no module guesses from its own file location."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA_ENV = "RKU_SHARED_DATA"
CACHE_ENV = "RKU_CACHE"


def project_root() -> Path | None:
    """The source checkout this package runs from (an editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "rku_lightning").is_dir() else None


def shared_data_dir() -> Path:
    """The local data folder: `RKU_SHARED_DATA`, else `../shared/data` beside the checkout (or the working directory)."""
    if env := os.environ.get(SHARED_DATA_ENV):
        return Path(env)
    return (project_root() or Path.cwd()).parent / "shared" / "data"


def task_file(task: str, split: str) -> Path:
    """The shared copy of a task's split, e.g. `task_file("gsm8k", "train")`."""
    return shared_data_dir() / task / f"{split}.jsonl"


def cache_dir() -> Path:
    """Where assembled and converted embedded models live (`RKU_CACHE` overrides)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "rku_lightning"))
