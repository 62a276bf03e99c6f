"""`CausalLMPruningModule`: the standard LightningModule for prune-and-recover runs.

It holds a Hugging Face causal LM as `model` (the contract `RKUPruning` needs) and its tokenizer as
`tokenizer`; trains on prompt-masked chains of thought (labels -100 on the prompt) with the causal-LM
loss (`recovery="ce"`) or by distillation from a frozen copy of the dense model (`recovery="kd"`,
forward KL on the answer tokens; `training.distillation`); optimizes whatever requires gradients (the LoRA adapters that `RKUPruning` or `lora`
injected) with AdamW; and validates with the reasoning metrics: greedy-answer accuracy on the
in-distribution set (dataloader 0), teacher-forced CoT NLL split into reasoning/other tokens on the
same set, greedy-answer accuracy on an out-of-distribution set (dataloader 1, optional) and, with
`kl_to_dense`, the teacher-forced KL(dense || model) per token on the dense model's own answers
(`val/kl_to_dense`, when the validation batches carry them; `val/kl_to_dense_reasoning` on their
arithmetic tokens only) and on the gold solutions (`val/kl_to_dense_gold`): the fidelity metric that
recovery cannot game by learning a format.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics import Metric

from rku_lightning.callbacks.rku_pruning import restore_pruned_shapes
from rku_lightning.checks import one_of, positive_int
from rku_lightning.evaluation.generation import DEFAULT_MAX_NEW_TOKENS, generate_batch, stop_token_ids
from rku_lightning.evaluation.metrics import IGNORE_INDEX, ChainOfThoughtNLL, KLToReference, ReasoningAccuracy, score_answer
from rku_lightning.loading import DTYPES, DTypeName, load_causal_lm

from .distillation import RECOVERIES, Recovery, Teacher, check_distillation, distillation_loss
from .lora import inject_lora

IN_DISTRIBUTION, OUT_OF_DISTRIBUTION = 0, 1
#: Validation metrics shown in the progress bar.
PROGRESS_BAR = ("val/gsm8k_acc", "val/kl_to_dense")


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
        recovery: `ce` (cross-entropy on the batch's labelled tokens) or `kd` (distillation from the dense
            teacher; see `training.distillation`).
        kd_temperature, kd_alpha: the distillation temperature T > 0 and the weight in [0, 1] of
            cross-entropy mixed into the KD loss.
        kl_to_dense: log `val/kl_to_dense` (needs the teacher too).
        teacher_dtype: dtype of the frozen teacher (default: `dtype`); `bfloat16` halves its memory.
        teacher_device: where the teacher lives (default: beside the model), e.g. `cuda:1`.
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
        recovery: Recovery = "ce",
        kd_temperature: float = 1.0,
        kd_alpha: float = 0.0,
        kl_to_dense: bool = True,
        teacher_dtype: DTypeName | None = None,
        teacher_device: str | None = None,
    ):
        super().__init__()
        one_of("dtype", dtype, DTYPES)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        positive_int("max_new_tokens", max_new_tokens)
        positive_int("nll_batch_size", nll_batch_size, optional=True)
        one_of("recovery", recovery, RECOVERIES)
        check_distillation(kd_temperature, kd_alpha)
        if teacher_dtype is not None:
            one_of("teacher_dtype", teacher_dtype, DTYPES)
        self.save_hyperparameters()
        self.model, self.tokenizer = load_causal_lm(pretrained, dtype=DTYPES[dtype])
        #: The dense model as loaded, before pruning or LoRA (None when neither KD nor kl_to_dense needs it).
        self.teacher: Teacher | None = None
        if recovery == "kd" or kl_to_dense:
            self.teacher = Teacher(self.model, DTYPES[teacher_dtype] if teacher_dtype else None, teacher_device)
        if lora is not None:
            inject_lora(self.model, lora)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.gsm8k_accuracy = ReasoningAccuracy(max_new_tokens)
        self.ood_accuracy = ReasoningAccuracy(max_new_tokens)
        self.cot_nll = ChainOfThoughtNLL()
        self.kl_to_dense = KLToReference()
        #: The same KL on the arithmetic tokens of the dense answers only (numbers, `=`, operators: the CoT NLL's
        #: reasoning class): a model can match the teacher's prose and drift on the few tokens that decide an answer.
        self.kl_to_dense_reasoning = KLToReference()
        self.kl_to_dense_gold = KLToReference()
        self._eos: list[int] | None = None
        #: This validation epoch's answers, one dict per question (`RKUPruning` writes them per round).
        self.validation_generations: list[dict[str, Any]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        ).logits

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A pruned run's final checkpoint holds compacted weights: give the freshly loaded dense model their shapes.
        restore_pruned_shapes(self, checkpoint)

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to_device(self.device)

    def on_validation_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to_device(self.device)

    def on_train_start(self) -> None:
        # Loaders return models in eval mode and Lightning keeps module modes: LoRA dropout needs train mode.
        self.model.train()

    def _teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        return self.teacher.logits(input_ids, attention_mask, position_ids(attention_mask))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        size = batch["input_ids"].shape[0]
        if self.hparams.recovery == "ce":
            loss = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=position_ids(batch["attention_mask"]),
                labels=batch["labels"],
            ).loss
        else:
            logits = self(batch["input_ids"], batch["attention_mask"])
            teacher = self._teacher_logits(batch["input_ids"], batch["attention_mask"])
            parts = distillation_loss(logits, teacher, batch["labels"], self.hparams.kd_temperature, self.hparams.kd_alpha)
            loss = parts["loss"]
            self.log_dict({"train/kd": parts["kd"], "train/ce": parts["ce"]}, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def _update_kl(self, part: dict[str, torch.Tensor], logits: torch.Tensor, metric: KLToReference,
                   reasoning: KLToReference | None = None) -> None:
        """KL to the teacher over all of `part`'s labelled tokens, and over its reasoning tokens into `reasoning`."""
        teacher = self._teacher_logits(part["input_ids"], part["attention_mask"])
        metric.update(teacher, logits, part["labels"])
        if reasoning is not None:
            reasoning.update(teacher, logits, part["labels"].masked_fill(~part["reasoning_mask"], IGNORE_INDEX))

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
                if self.hparams.kl_to_dense:
                    self._update_kl(part, logits, self.kl_to_dense_gold)
                del logits  # free this slice's logits before the next forward allocates its own
        if in_distribution and self.hparams.kl_to_dense and "ref_input_ids" in batch:
            size = len(batch["ref_input_ids"])
            step = self.hparams.nll_batch_size or size
            for start in range(0, size, step):
                part = {k: batch[f"ref_{k}"][start : start + step] for k in ("input_ids", "attention_mask", "labels", "reasoning_mask")}
                with torch.no_grad():
                    logits = self(part["input_ids"], part["attention_mask"])
                self._update_kl(part, logits, self.kl_to_dense, self.kl_to_dense_reasoning)
                del logits
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

    def on_validation_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        # A set's metrics are logged during its own last batch: Lightning lists what is logged during a dataloader's
        # batches under that dataloader only (what is logged at epoch end it lists under every dataloader).
        trainer = self.trainer
        counts = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        if batch_idx + 1 == counts[dataloader_idx]:
            self._log_set(dataloader_idx == IN_DISTRIBUTION)

    def on_validation_epoch_end(self) -> None:
        # What is left: a set whose loader has no length (Lightning then lists it under every dataloader).
        for in_distribution in (True, False):
            self._log_set(in_distribution)

    def _set_metrics(self, in_distribution: bool) -> tuple[Metric, ...]:
        if in_distribution:
            return self.gsm8k_accuracy, self.cot_nll, self.kl_to_dense, self.kl_to_dense_reasoning, self.kl_to_dense_gold
        return (self.ood_accuracy,)

    def _set_values(self, in_distribution: bool) -> dict[str, torch.Tensor]:
        """The metrics of one validation set that saw batches since they were last reset."""
        accuracy, task = (self.gsm8k_accuracy, "gsm8k") if in_distribution else (self.ood_accuracy, "ood")
        values = {}
        if accuracy.update_called:
            # How often the answer budget, not the model, decided a question (see ReasoningAccuracy).
            result = accuracy.compute()
            values.update({f"val/{task}_acc": result["accuracy"], f"val/{task}_truncated": result["truncated_rate"]})
            if result["steps"] > 0:  # synced state: every rank takes the same branch
                values[f"val/{task}_steps_right"] = result["steps_right_rate"]
        if not in_distribution:
            return values
        if self.cot_nll.update_called:
            nll = self.cot_nll.compute()
            values.update({f"val/cot_{key}": nll[key] for key in ("nll", "nll_reasoning", "nll_other")})
        for name, metric in (("val/kl_to_dense", self.kl_to_dense), ("val/kl_to_dense_reasoning", self.kl_to_dense_reasoning),
                             ("val/kl_to_dense_gold", self.kl_to_dense_gold)):
            # Answers without arithmetic tokens leave the reasoning KL without a mean: NaN from the synced sums, so
            # every rank skips it alike.
            if metric.update_called and not torch.isnan(value := metric.compute()):
                values[name] = value
        return values

    def _log_set(self, in_distribution: bool) -> None:
        """Log one validation set's metrics and reset them."""
        # compute() syncs the metrics' sum states across ranks; sync_dist then averages equal values.
        for name, value in self._set_values(in_distribution).items():
            self.log(name, value, prog_bar=name in PROGRESS_BAR, sync_dist=True, batch_size=1, add_dataloader_idx=False)
        # States re-created under `trainer.validate`'s inference mode could not be updated in a later
        # `fit` validation (no inference mode there): make them normal tensors.
        with torch.inference_mode(False):
            for metric in self._set_metrics(in_distribution):
                metric.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "configure_optimizers: nothing to train; inject LoRA adapters (RKUPruning(lora=...) or "
                "CausalLMPruningModule(lora=...)) or unfreeze parameters"
            )
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
