"""Scoring objectives Phi(x), one value per calibration sample so that gate gradients are per sample.

- `ce`: mean next-token cross-entropy over the sample's labelled tokens (labels default to the
  non-padding input tokens; -100 marks tokens to ignore, e.g. a masked prompt).
- `hidden`: label-free, 0.5 * mean over the sample's tokens of ||h_L||^2, h_L the last decoder
  layer's output before the final norm. Usable on questions-only text.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from rku_lightning.checks import one_of

from .families import ModelFamily

Objective = Callable[[ModelFamily, dict[str, torch.Tensor]], torch.Tensor]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits lose small gate gradients; compute objectives in fp32 or better."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch.get("labels")
    if labels is not None:
        return labels
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def cross_entropy_objective(family: ModelFamily, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # No KV cache: a checkpointed layer would append its keys twice when it recomputes.
    hidden = family.decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    labels = _labels(batch)[:, 1:]
    valid = labels != -100
    # Logits of the labelled positions only: a masked prompt needs none, and with a 150k-token
    # vocabulary the full (batch, length, vocabulary) logits and their gradient dominate scoring memory.
    logits = _at_least_fp32(family.model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][valid]))
    token_loss = F.cross_entropy(logits, labels[valid], reduction="none")
    rows = valid.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows, token_loss)
    return sums / valid.sum(1).clamp_min(1).to(sums.dtype)


def hidden_energy_objective(family: ModelFamily, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    handle = family.final_norm().register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        family.decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    hidden = _at_least_fp32(captured[-1])
    mask = batch["attention_mask"].to(hidden.dtype)
    energy = 0.5 * hidden.pow(2).sum(-1)
    return (energy * mask).sum(1) / mask.sum(1).clamp_min(1)


def scored_tokens(name: str, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(tokens the objective `name` scores, non-padding tokens) of a batch.

    The objectives divide by at least one token, so a batch with none scores 0 and gives zero gradients
    silently; callers count with this to refuse such calibration.
    """
    attended = int(batch["attention_mask"].sum())
    return (int((_labels(batch)[:, 1:] != -100).sum()) if name == "ce" else attended), attended


ObjectiveName = Literal["ce", "hidden"]
OBJECTIVES: dict[str, Objective] = {"ce": cross_entropy_objective, "hidden": hidden_energy_objective}


def get_objective(name: ObjectiveName) -> Objective:
    return OBJECTIVES[one_of("objective", name, OBJECTIVES)]
