"""Recovery by distillation from the dense model: the loss, and the frozen teacher that provides its logits.

Forward KL(teacher || student) on the teacher's logits at temperature 1 is what the width-pruning
literature measured best for recovery (Minitron, arXiv 2407.14679 / 2408.11796; docs/method.md). It
cannot be lowered by copying a dataset's format: it is 0 only where the student predicts what the
dense model predicted, everywhere in the vocabulary.

The teacher is a frozen copy of the dense model taken when the module is built, before any pruning
or LoRA. It is held outside the module tree on purpose: it never enters `state_dict`, a checkpoint or
DDP's gradient sync, and a resumed run rebuilds it from the same dense source.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from rku_lightning.evaluation.metrics import IGNORE_INDEX, token_kl

Recovery = Literal["ce", "kd"]
RECOVERIES: tuple[str, ...] = ("ce", "kd")


def check_distillation(temperature: float, alpha: float) -> None:
    """Fail before any compute on settings the loss cannot use."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"kd_temperature must be a number > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"kd_alpha (weight of cross-entropy in the mix) must be in [0, 1], got {alpha!r}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * T^2 * KL(teacher || student) + alpha * CE`` over the labelled (answer) tokens.

    KL is averaged per token; the T^2 factor keeps gradient sizes comparable across temperatures
    (Hinton et al.). Returns the loss and its parts (detached) for logging.
    """
    kl = token_kl(teacher_logits, student_logits, labels, temperature)
    kd = kl.mean() * temperature**2 if kl.numel() else student_logits.sum() * 0.0
    valid = labels[:, 1:] != IGNORE_INDEX
    ce = F.cross_entropy(student_logits[:, :-1][valid].float(), labels[:, 1:][valid])
    loss = (1 - alpha) * kd + alpha * ce if alpha > 0 else kd
    return {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}


class Teacher:
    """A frozen copy of the dense model, in eval mode, optionally in another dtype or on another device.

    Not an `nn.Module` attribute of the LightningModule (see the module docstring): it moves only when
    `to_device` says so.
    """

    def __init__(self, model: PreTrainedModel, dtype: torch.dtype | None = None, device: str | None = None):
        self.model = copy.deepcopy(model).eval()
        if dtype is not None:
            self.model.to(dtype)
        self.model.requires_grad_(False)
        self.device = device

    def to_device(self, default: torch.device) -> None:
        """Put the teacher where it was asked to live, else beside the student."""
        target = torch.device(self.device) if self.device else default
        if next(self.model.parameters()).device != target:
            self.model.to(target)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = self.model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids.to(device)
        ).logits
        return out.to(input_ids.device)
