"""Save and load pruned models.

`save_pruned` writes safetensors, config, tokenizer and `pruning.json` into a temporary folder and
renames it, so an interrupted export never leaves a half-written model. Uniformly pruned models
(every layer the same shape) load with plain `AutoModelForCausalLM.from_pretrained`; models with
per-layer shapes keep the dense config and are rebuilt by `load_pruned` from `pruning.json`, which
is validated first (`plan.py`). `format="gguf"` writes a llama.cpp file instead (`gguf.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights

from rku_lightning.files import check_can_create, recover_replaced, write_folder_atomic
from rku_lightning.loading import prepare_tokenizer

from .compaction import apply_plan
from .families import get_family, unwrap_model
from .gguf import save_gguf
from .plan import LAYER_FIELDS, PLAN_FILE, PlanError, layers_digest, validate_config, validate_plan, validate_weights

EXPORT_FORMATS = ("safetensors", "gguf")


def check_export_target(out_dir: str | os.PathLike, overwrite: bool = False, format: str = "safetensors") -> Path:
    """Refuse an `out_dir` that an export may not be written to, before any work (CLIs call it first).

    Like `save_pretrained`, an absent or empty folder is fine; a non-empty one needs `overwrite`, and
    `overwrite` only replaces a folder that holds an export (`pruning.json`), never a file or other data.
    A GGUF export is one `.gguf` file, replaced only with `overwrite`. The nearest existing ancestor must
    be a writable folder.
    """
    out_dir = Path(out_dir)
    if format == "gguf":
        if out_dir.suffix != ".gguf" or out_dir.is_dir():
            raise ValueError(f"out_dir {out_dir}: a GGUF export is one file whose name ends in .gguf")
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"out_dir {out_dir} already exists; choose a new file name or pass overwrite=True")
        check_can_create(out_dir, "out_dir")
        return out_dir
    recover_replaced(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise FileExistsError(f"out_dir {out_dir} is a file, not a folder; choose a folder path for the export")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"out_dir {out_dir} already exists and is not empty; choose a new or empty folder or pass overwrite=True"
                )
            if not (out_dir / PLAN_FILE).is_file():
                raise FileExistsError(
                    f"out_dir {out_dir} holds no {PLAN_FILE}, so it is not an rku_lightning export; overwrite only "
                    "replaces exports: choose another folder"
                )
    check_can_create(out_dir, "out_dir")
    return out_dir


def save_pruned(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    metadata: dict | None = None,
    format: str = "safetensors",
    gguf_dtype: str = "f16",
) -> Path:
    """Write a compacted model, its tokenizer and `pruning.json` to `out_dir` atomically.

    `format="gguf"` writes one llama.cpp file instead (`out_dir` is then a `.gguf` path, `gguf_dtype`
    f32/f16/bf16), with the pruning plan inside it; see `rku_lightning.pruning.gguf`.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    model = unwrap_model(model)
    if getattr(model, "rku_gates", None) is not None:
        raise ValueError("save_pruned: the model still holds masks; call compact(model) before saving")
    plan = getattr(model, "rku_pruning_plan", None)
    if plan is None:
        raise ValueError("save_pruned: the model was not pruned by rku_lightning (no pruning plan); use save_pretrained")
    check_export_target(out_dir, overwrite, format)
    if format == "gguf":
        return save_gguf(model, tokenizer, out_dir, gguf_dtype, overwrite, metadata={**plan, **(metadata or {})})

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        if not plan["uniform_shapes"]:
            # Per-layer shapes: keep the dense config so that load_pruned can rebuild and slice it.
            config = model.config.to_dict()
            config.update({k: plan["original"][k] for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads")})
            config["rku_pruning"] = f"per-layer shapes: load with rku_lightning.load_pruned (see {PLAN_FILE})"
            (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        record = {**plan, **(metadata or {}), "layers_sha256": layers_digest(plan["layers"])}
        (folder / PLAN_FILE).write_text(json.dumps(record, indent=2))

    return write_folder_atomic(out_dir, write)


def _module_fields(model: PreTrainedModel) -> dict[str, tuple[int, str]]:
    """Module name -> (layer, plan field) of every sliced projection, so a shape error names what to fix."""
    owner: dict[int, tuple[int, str]] = {}
    mlp, heads, groups = LAYER_FIELDS
    for view in get_family(model).views():
        for field, modules in ((mlp, (*view.mlp_rows, view.mlp_out)), (heads, (view.q, view.o)), (groups, view.kv_rows)):
            owner.update({id(m): (view.index, field) for m in modules})
    return {name: owner[id(m)] for name, m in model.named_modules() if id(m) in owner}


def read_plan(out_dir: str | os.PathLike) -> dict:
    """The validated `pruning.json` of an export folder."""
    plan_path = Path(out_dir) / PLAN_FILE
    if not plan_path.is_file():
        raise FileNotFoundError(f"{out_dir} has no {PLAN_FILE}; it was not written by save_pruned")
    try:
        plan = json.loads(plan_path.read_text())
    except json.JSONDecodeError as error:
        raise PlanError(f"{plan_path}: not valid JSON ({error}); re-export the model with save_pruned") from error
    validate_plan(plan, str(plan_path))
    return plan


def load_pruned(
    out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model written by `save_pruned`, whatever its per-layer shapes, after checking `pruning.json`."""
    out_dir = Path(out_dir)
    plan = read_plan(out_dir)
    config = AutoConfig.from_pretrained(out_dir)
    validate_config(plan, config, str(out_dir / PLAN_FILE))
    state = {}
    for shard in sorted(out_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not plan["uniform_shapes"]:
        apply_plan(model, plan)
    validate_weights(model, state, _module_fields(model), str(out_dir / PLAN_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{out_dir}: weights do not match the pruning plan (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    model.rku_pruning_plan = plan
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(out_dir)) if (out_dir / "tokenizer_config.json").exists() else None
    return model, tokenizer
