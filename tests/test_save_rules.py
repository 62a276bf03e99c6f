"""Saving like transformers does, overwrite only of exports, kill-safety, and a checked pruning.json."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import backdate, tiny_model, tiny_tokenizer

from rku_lightning import StructuredPruner, compact, load_pruned, save_pruned
from rku_lightning.files import sweep_stale_temporaries, temporary_beside, write_text_atomic

TESTS = Path(__file__).resolve().parent


def compacted(family: str = "llama", allocation: str = "global", sparsity: float = 0.4):
    model = tiny_model(family)
    StructuredPruner(model, importance="magnitude", allocation=allocation, progress=False).prune(sparsity)
    compact(model)
    return model


def test_an_existing_empty_folder_is_a_valid_target():
    model = compacted()
    with tempfile.TemporaryDirectory() as folder:
        save_pruned(model, None, folder)
        assert (Path(folder) / "pruning.json").is_file()
        load_pruned(folder)


@pytest.mark.parametrize(
    "make, overwrite, message",
    [
        (lambda p: p.write_text("x"), False, "is a file"),
        (lambda p: p.write_text("x"), True, "is a file"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), False, "not empty.*overwrite=True"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), True, "not an rku_lightning export"),
        (lambda p: p.parent.joinpath("blocker").write_text("x"), False, "is a file, so nothing can be created"),
    ],
    ids=["file", "file-overwrite", "non-empty", "unrelated-overwrite", "parent-is-a-file"],
)
def test_refused_targets_are_left_untouched(tmp_path, make, overwrite, message):
    target = tmp_path / "out"
    make(target)
    if (tmp_path / "blocker").exists():
        target = tmp_path / "blocker" / "out"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(OSError, match=message):
        save_pruned(compacted(), None, target, overwrite=overwrite)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing removed, no .X.old, no temporary


def test_a_read_only_parent_is_refused(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes into read-only folders; ask as an ordinary user would be answered
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    with pytest.raises(PermissionError, match="not writable"):
        save_pruned(compacted(), None, tmp_path / "ro" / "out")


def test_overwrite_replaces_an_export_and_leaves_nothing_aside(tmp_path):
    save_pruned(compacted(sparsity=0.2), None, tmp_path / "out")
    save_pruned(compacted(sparsity=0.4), None, tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert json.loads((tmp_path / "out" / "pruning.json").read_text())["rounds"][-1]["target_sparsity"] == 0.4


KILL_BETWEEN_RENAMES = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
real = os.replace
def replace(src, dst):
    real(src, dst)
    if Path(dst).name.endswith(".old"):  # the old export is aside, the new one not yet in: the worst moment
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from rku_lightning.cli.prune import main
main(["--model", {model!r}, "--sparsity", "0.4", "--importance", "magnitude", "--out", {out!r}, "--overwrite"])
"""


@pytest.mark.slow
def test_sigkill_during_cli_overwrite_is_recovered(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model("llama", max_position_embeddings=1024).save_pretrained(model_dir)
    tiny_tokenizer(tmp_path).save_pretrained(model_dir)
    out = tmp_path / "exports" / "run1"
    save_pruned(compacted(sparsity=0.2), None, out)
    script = KILL_BETWEEN_RENAMES.format(tests=str(TESTS), model=str(model_dir), out=str(out))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=TESTS.parent, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = sorted(p.name for p in out.parent.iterdir())
    assert "run1" not in left and ".run1.old" in left and any(".rku-" in name for name in left)
    with pytest.warns(UserWarning, match="restored the previous copy"):
        save_pruned(compacted(sparsity=0.4), None, out, overwrite=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["run1"]  # old restored then replaced; temporary swept
    assert json.loads((out / "pruning.json").read_text())["rounds"][-1]["target_sparsity"] == 0.4


def test_a_killed_writers_temporaries_are_swept_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine = temporary_beside(tmp_path / "out")
    theirs = tmp_path / mine.name.replace(f"-{os.getpid()}.", f"-{dead.stdout.strip()}.")
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"half")
    with pytest.warns(UserWarning, match="interrupted runs"):
        assert sweep_stale_temporaries(tmp_path) == [theirs]
    assert mine.is_dir() and not theirs.exists()


def _earlier_versions_temporaries(folder: Path) -> list[Path]:
    """Made as the earlier writers made them (export/conversion folders, reports, GGUF parts, JSON writes)."""
    made = [Path(tempfile.mkdtemp(prefix=".run3.", dir=folder))]
    for prefix, suffix in ((".run3.", ""), (".run3.", ".part"), (".run3.", ".tmp")):
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        os.close(handle)
        made.append(Path(name))
    for suffix in (".part", ".tmp"):
        with tempfile.NamedTemporaryFile(dir=folder, delete=False, suffix=suffix) as handle:
            made.append(Path(handle.name))
    return made


# Not temporaries of run3: hidden folders and files of the user's, the copy `overwrite` puts aside, other
# targets' names of the same form (`.bashrc.original` is `.NAME.` and 8 characters too), other `.part` files.
NOT_TEMPORARIES = [".git", ".venv", ".cache", ".run3.old", ".bashrc.original", ".run4.k2j4l1x9", ".run3.backup",
                   ".run3.K2J4L1X9", "movie.mkv.part", "tmp.part", "tmpk2j4l1x9.json"]


def test_temporaries_of_earlier_versions_are_swept_by_age_and_nothing_else(tmp_path):
    legacy = [backdate(path) for path in _earlier_versions_temporaries(tmp_path)]
    young = _earlier_versions_temporaries(tmp_path)  # maybe still being written by an earlier version
    for name in NOT_TEMPORARIES:
        path = tmp_path / name
        if "." in name[1:]:
            path.write_text("mine")
        else:
            path.mkdir()
        backdate(path)
    with pytest.warns(UserWarning, match="interrupted runs"):
        assert sorted(sweep_stale_temporaries(tmp_path, target="run3")) == sorted(legacy)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NOT_TEMPORARIES + [p.name for p in young])


def test_an_export_sweeps_the_temporary_an_earlier_version_left_for_it(tmp_path):
    left = Path(tempfile.mkdtemp(prefix=".run3.", dir=tmp_path))  # an earlier save_pruned, killed
    (left / "model.safetensors").write_bytes(b"half")
    backdate(left)
    for name in (".git", ".venv", ".cache"):
        (tmp_path / name).mkdir()
        backdate(tmp_path / name)
    with pytest.warns(UserWarning, match=re.escape(f"interrupted runs in {tmp_path}: {left.name}") + "$"):
        save_pruned(compacted(), None, tmp_path / "run3")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", ".git", ".venv", "run3"]


def test_a_failed_atomic_write_leaves_no_temporary(tmp_path):
    with pytest.raises(TypeError):
        write_text_atomic(tmp_path / "report.json", object())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def _edit(folder: Path, edit) -> None:
    plan = json.loads((folder / "pruning.json").read_text())
    edit(plan)
    (folder / "pruning.json").write_text(json.dumps(plan))


def _swap_first_channel(plan: dict) -> None:
    channels = plan["layers"][0]["mlp_channels"]
    missing = next(i for i in range(plan["original"]["intermediate_size"]) if i not in channels)
    plan["layers"][0]["mlp_channels"] = sorted([missing, *channels[1:]])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda folder: (folder / "pruning.json").write_text("{not json"), "not valid JSON"),
        (lambda folder: _edit(folder, lambda p: p.pop("layers")), "field 'layers': has .* entries, original.num_hidden_layers is 2"),
        (lambda folder: _edit(folder, lambda p: p["layers"].pop()), "field 'layers': has .* entries, original.num_hidden_layers is 2"),
        (lambda folder: _edit(folder, lambda p: p["layers"][1].pop("heads")), "layer 1 field 'heads'"),
        (lambda folder: _edit(folder, lambda p: p["layers"][0]["mlp_channels"].append(10_000)), "layer 0 field 'mlp_channels'.*64"),
        (lambda folder: _edit(folder, lambda p: p["layers"][1]["kv_groups"].reverse()), "layer 1 field 'kv_groups'"),
        (lambda folder: _edit(folder, lambda p: p["layers"][0]["mlp_channels"].pop()), "were edited"),
        (lambda folder: _edit(folder, lambda p: (p["layers"][0]["mlp_channels"].pop(), p.pop("layers_sha256"))), "layer 0 field 'mlp_channels': .*down_proj"),
        (lambda folder: _edit(folder, _swap_first_channel), "were edited"),
        (lambda folder: _edit(folder, lambda p: p["original"].update(head_dim=0)), "original.head_dim"),
    ],
    ids=["json", "no-layers", "layer-count", "no-field", "out-of-range", "unsorted", "count", "count-no-digest", "same-counts", "original"],
)
def test_an_edited_plan_names_the_layer_and_field(tmp_path, edit, message):
    save_pruned(compacted("qwen2"), None, tmp_path / "out")
    edit(tmp_path / "out")
    with pytest.raises(ValueError, match=message):
        load_pruned(tmp_path / "out")


def test_a_uniform_plan_must_agree_with_the_config(tmp_path):
    save_pruned(compacted("llama", allocation="uniform"), None, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["intermediate_size"] += 1
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="intermediate_size"):
        load_pruned(tmp_path / "out")
