"""Save and load pruned models.

`save_pruned` writes safetensors, config, tokenizer and `pruning.json` into a temporary folder and
renames it, so an interrupted export never leaves a half-written model. Uniformly pruned models
(every layer the same shape) load with plain `AutoModelForCausalLM.from_pretrained`; models with
per-layer shapes keep the dense config and are rebuilt by `load_pruned` from `pruning.json`.
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
from .families import unwrap_model
from .plan_file import PLAN_FILE, check_config_counts, check_weight_shapes, layers_digest, read_plan


def check_export_target(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an `out_dir` that an export may not be written to, before any work (CLIs call it first).

    Like `save_pretrained`, an absent or empty folder is fine; a non-empty one needs `overwrite`, and
    `overwrite` only replaces a folder that holds an export (`pruning.json`), never a file or other data.
    The nearest existing ancestor must be a writable folder.
    """
    out_dir = Path(out_dir)
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
) -> Path:
    """Write a compacted model, its tokenizer and `pruning.json` to `out_dir` atomically."""
    model = unwrap_model(model)
    if getattr(model, "rku_gates", None) is not None:
        raise ValueError("save_pruned: the model still holds masks; call compact(model) before saving")
    plan = getattr(model, "rku_pruning_plan", None)
    if plan is None:
        raise ValueError("save_pruned: the model was not pruned by rku_lightning (no pruning plan); use save_pretrained")

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

    check_export_target(out_dir, overwrite)
    return write_folder_atomic(out_dir, write)


def load_pruned(
    out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model written by `save_pruned`, whatever its per-layer shapes."""
    out_dir = Path(out_dir)
    plan = read_plan(out_dir)
    if plan["uniform_shapes"]:
        check_config_counts(out_dir, plan, AutoConfig.from_pretrained(out_dir))
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype)
    else:
        config = AutoConfig.from_pretrained(out_dir)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        apply_plan(model, plan)
        state = {}
        for shard in sorted(out_dir.glob("*.safetensors")):
            state.update(load_file(shard))
        check_weight_shapes(out_dir, model, state)
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
