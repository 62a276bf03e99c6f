"""`CausalLMPruningModule`: the standard LightningModule for prune-and-recover runs.

It holds a Hugging Face causal LM as `model` (the contract `RKUPruning` needs) and its tokenizer as
`tokenizer`; trains with the causal-LM loss on prompt-masked chains of thought (labels -100 on the
prompt); optimizes whatever requires gradients (the LoRA adapters that `RKUPruning` or `lora`
injected) with AdamW; and validates with the reasoning metrics: greedy-answer accuracy on the
in-distribution set (dataloader 0), teacher-forced CoT NLL split into reasoning/other tokens on the
same set, and greedy-answer accuracy on an out-of-distribution set (dataloader 1, optional).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

from rku_lightning.checks import one_of, positive_int
from rku_lightning.evaluation.generation import DEFAULT_MAX_NEW_TOKENS, generate_batch, stop_token_ids
from rku_lightning.evaluation.metrics import ChainOfThoughtNLL, ReasoningAccuracy, score_answer
from rku_lightning.loading import DTYPES, DTypeName, load_causal_lm

from .lora import inject_lora

IN_DISTRIBUTION, OUT_OF_DISTRIBUTION = 0, 1


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them, so training and decoding agree."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class CausalLMPruningModule(LightningModule):
    """Causal-LM fine-tuning with reasoning validation; see the module docstring.

    Args:
        pretrained: hub id, local folder, `.gguf` file or `embedded:NAME` (`load_causal_lm`).
        dtype: weights dtype, `float32`, `bfloat16` or `float16` (LoRA adapters stay fp32).
        lr, weight_decay: AdamW settings.
        lora: inject LoRA adapters here (dict of `LoRASettings`); `RKUPruning` injects its own otherwise.
        max_new_tokens: generation budget per validation question.
        generate: False validates with CoT NLL only (no answers, so no accuracy, and the OOD set, which has
            no worked solutions, measures nothing): minutes instead of hours per round on CPU.
        gradient_checkpointing: trade compute for activation memory (large models).
        nll_batch_size: sequences per forward pass when validation scores CoT NLL. The logits of a whole
            validation batch are (batch, length, vocabulary) floats, twice over with the log-softmax:
            16 x 384 tokens of Qwen2.5's 151,936-token vocabulary is 7.5 GB, enough to run a 24 GB
            machine out of memory after training has fragmented its heap. `None` scores the batch at once.
    """

    def __init__(
        self,
        pretrained: str = "embedded:smollm2-135m-instruct",
        dtype: DTypeName = "float32",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        lora: dict[str, Any] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        generate: bool = True,
        gradient_checkpointing: bool = False,
        nll_batch_size: int | None = 4,
    ):
        super().__init__()
        one_of("dtype", dtype, DTYPES)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        positive_int("max_new_tokens", max_new_tokens)
        positive_int("nll_batch_size", nll_batch_size, optional=True)
        self.save_hyperparameters()
        self.model, self.tokenizer = load_causal_lm(pretrained, dtype=DTYPES[dtype])
        if lora is not None:
            inject_lora(self.model, lora)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.gsm8k_accuracy = ReasoningAccuracy()
        self.ood_accuracy = ReasoningAccuracy()
        self.cot_nll = ChainOfThoughtNLL()
        self._eos: list[int] | None = None
        #: This validation epoch's answers, one dict per question (`RKUPruning` writes them per round).
        self.validation_generations: list[dict[str, Any]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        ).logits

    def on_train_start(self) -> None:
        # Loaders return models in eval mode and Lightning keeps module modes: LoRA dropout needs train mode.
        self.model.train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids(batch["attention_mask"]),
            labels=batch["labels"],
        ).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        in_distribution = dataloader_idx == IN_DISTRIBUTION
        if in_distribution and "labels" in batch:
            size = len(batch["input_ids"])
            step = self.hparams.nll_batch_size or size
            for start in range(0, size, step):
                part = {k: batch[k][start : start + step] for k in ("input_ids", "attention_mask", "labels", "reasoning_mask")}
                with torch.no_grad():
                    logits = self(part["input_ids"], part["attention_mask"])
                self.cot_nll.update(logits, part["labels"], part["reasoning_mask"])
                del logits  # free this slice's logits before the next forward allocates its own
        if not self.hparams.generate:
            return
        if self._eos is None:
            self._eos = stop_token_ids(self.model, self.tokenizer)
        texts, lengths = generate_batch(
            self.model, self.tokenizer, batch["prompt"], self.hparams.max_new_tokens, eos_token_ids=self._eos
        )
        (self.gsm8k_accuracy if in_distribution else self.ood_accuracy).update(texts, batch["answer"], lengths)
        task = "gsm8k" if in_distribution else "ood"
        for index, answer, text, tokens in zip(batch["index"], batch["answer"], texts, lengths):
            predicted, correct = score_answer(text, answer)
            self.validation_generations.append(
                {"task": task, "index": index, "answer": answer, "predicted": predicted, "correct": correct, "tokens": int(tokens), "text": text}
            )

    def on_validation_epoch_start(self) -> None:
        self.validation_generations = []

    def on_validation_epoch_end(self) -> None:
        # compute() syncs the metrics' sum states across ranks; sync_dist then averages equal values.
        if self.gsm8k_accuracy.update_called:
            self.log("val/gsm8k_acc", self.gsm8k_accuracy.compute()["accuracy"], prog_bar=True, sync_dist=True)
        if self.cot_nll.update_called:
            nll = self.cot_nll.compute()
            for key in ("nll", "nll_reasoning", "nll_other"):
                self.log(f"val/cot_{key}", nll[key], sync_dist=True)
        if self.ood_accuracy.update_called:
            self.log("val/ood_acc", self.ood_accuracy.compute()["accuracy"], sync_dist=True)
        # States re-created under `trainer.validate`'s inference mode could not be updated in a later
        # `fit` validation (no inference mode there): make them normal tensors.
        with torch.inference_mode(False):
            for metric in (self.gsm8k_accuracy, self.cot_nll, self.ood_accuracy):
                metric.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "configure_optimizers: nothing to train; inject LoRA adapters (RKUPruning(lora=...) or "
                "CausalLMPruningModule(lora=...)) or unfreeze parameters"
            )
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
