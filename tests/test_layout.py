"""The package layout: the callback under the project's namespace, an installable wheel, one path resolver."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rku_lightning import paths

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_callbacks_folder_re_exports_the_installed_class(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from callbacks import RKUProgressBar as Bar
    from callbacks import RKUPruning as FromFolder
    from rku_lightning.callbacks import RKUProgressBar, RKUPruning

    assert FromFolder is RKUPruning and Bar is RKUProgressBar


def test_shared_data_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.SHARED_DATA_ENV, str(tmp_path))
    assert paths.shared_data_dir() == tmp_path
    assert paths.task_file("gsm8k", "train") == tmp_path / "gsm8k" / "train.jsonl"
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    assert paths.cache_dir() == tmp_path / "cache"


def test_shared_data_defaults_to_the_folder_beside_the_checkout(monkeypatch):
    monkeypatch.delenv(paths.SHARED_DATA_ENV, raising=False)
    assert paths.project_root() == ROOT
    assert paths.shared_data_dir() == ROOT.parent / "shared" / "data"
    # The tests read it: a missing folder is a broken checkout, not a reason to skip them.
    assert paths.shared_data_dir().is_dir()


def _run(*args: str, cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_the_wheel_installs_rku_lightning_callbacks_and_no_top_level_callbacks(tmp_path):
    """Build a wheel of the working tree, install it (not editable) into a fresh venv, import it from outside the repo."""
    source = tmp_path / "source"
    files = _run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\n")
    for name in filter(None, files):  # a copy, so that the build leaves nothing in the checkout
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("rku_lightning-*.whl")
    venv = tmp_path / "venv"
    # System site-packages supply torch and lightning; the venv's own copy of rku_lightning comes first on sys.path.
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--force-reinstall", str(wheel), cwd=tmp_path)
    probe = (
        "import importlib.util, rku_lightning, rku_lightning.callbacks as c\n"
        "from rku_lightning.callbacks import RKUPruning\n"
        "print(rku_lightning.__file__); print(c.__file__); print(importlib.util.find_spec('callbacks'))\n"
    )
    package, callbacks, top_level = _run(str(python), "-c", probe, cwd=tmp_path).split()
    site = venv.resolve()
    assert Path(package).resolve().is_relative_to(site) and Path(callbacks).resolve().is_relative_to(site)
    assert top_level == "None"
