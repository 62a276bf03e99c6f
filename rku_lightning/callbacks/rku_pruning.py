"""`RKUPruning`: turns a Lightning fine-tuning run of a Hugging Face causal LM into iterative
prune-and-recover rounds. Orchestration only: scoring, masking, compaction and export are the
engine's (`rku_lightning.StructuredPruner`, `compact`, `save_pruned`).

A round r = 1..R is: calibrate (own pass over calibration batches, base weights frozen, only gates
get gradients) -> prune to the schedule's sparsity -> `recovery_steps` ordinary optimizer steps of
LoRA adapters -> merge the adapters into the base weights, re-initialise them, reset their optimizer
state -> the validation loop evaluates the round. The callback owns the run's length
(`max_steps = rounds * recovery_steps`) and validation cadence (every `recovery_steps` steps).

The phase machine is driven by `global_step`, and its state (round, phase, masks, statistics,
per-round records, the settings that made them) is checkpointed, so a run resumed from a round-end
checkpoint with the same settings and a resumable train loader ends with the same masks and metrics
as an uninterrupted one. The last round compacts the model before its checkpoint is written, and the
checkpoint carries the plan (`restore_pruned_shapes` rebuilds the shapes on load). After `fit` the
module holds a plain compacted Hugging Face model. Contract for the LightningModule: docs/lightning.md.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rku_lightning.checks import positive_int
from rku_lightning.files import write_text_atomic
from rku_lightning.memory import memory_snapshot, reset_peak_memory
from rku_lightning.pruning.compaction import compact, conform_to_plan, is_compacted
from rku_lightning.pruning.export import check_export_target, save_pruned
from rku_lightning.pruning.families import get_family, unwrap_model
from rku_lightning.pruning.importance import Importance
from rku_lightning.pruning.objectives import ObjectiveName
from rku_lightning.pruning.pruner import PruneReport, StructuredPruner
from rku_lightning.pruning.schedules import Schedule, check_schedule, sparsity_at
from rku_lightning.pruning.settings import Allocation, Attention, PruningSettings
from rku_lightning.training.lora import (
    LoRASettings,
    has_lora,
    inject_lora,
    lora_parameters,
    merge_and_reinit_,
    remove_lora_,
    reset_optimizer_state_,
)

PHASES = ("calibrate", "recover", "evaluate", "done", "stopped")
#: LoRASettings' defaults as the mapping a config gives (target_modules: the family's projections).
DEFAULT_LORA: dict[str, Any] = {k: v for k, v in vars(LoRASettings()).items() if k != "target_modules"}
#: Validation metrics recorded per round: everything the validation loop logs under these prefixes.
METRIC_PREFIXES = ("val/", "val_")
#: Where a checkpoint keeps the pruning plan of each pruned attribute (`model_attr` -> plan).
PLANS_KEY = "rku_pruning_plans"
#: Settings a resumed run must share with the run that wrote the checkpoint (they decide masks and records).
RESUME_FIELDS = ("target_sparsity", "rounds", "schedule", "importance", "objective", "allocation", "attention",
                 "min_mlp_keep", "calibration_batches", "recovery_steps", "lora", "seed", "model_attr")


class RKUPruning(Callback):
    """Iterative structured pruning with LoRA recovery between rounds, inside one `trainer.fit`.

    Args:
        target_sparsity: fraction of decoder-layer parameters removed after the last round.
        rounds: number of prune-and-recover rounds.
        schedule: `cubic`, `linear` or `constant` (see `rku_lightning.pruning.schedules`).
        importance: a registered method name (built in: rku, kinetic, flap, wanda_sp, taylor, magnitude,
            random; `register_importance` adds names, so the type stays `str`) or an `Importance` (in a
            config: `class_path` and `init_args`).
        objective, allocation, attention, min_mlp_keep, micro_batch_size, checkpoint_layers: with
            `importance`, the `PruningSettings` of the run's `StructuredPruner` (`self.settings`).
        calibration_batches: batches per calibration pass, over all DDP ranks together (rank k takes
            batches k, k + W, ...), from the datamodule's or module's `calibration_dataloader()` if
            there is one, else from the train loader. A maker's `calibration_info` (a dict, read after
            each call) goes into the round's record as `calibration`.
        recovery_steps: optimizer steps of recovery per round.
        lora: LoRA settings (`r`, `alpha`, `dropout`, `target_modules`) for adapters the callback
            injects at setup; `None` injects none (recovery then trains what the module's optimizer
            holds and nothing is merged). Adapters the module injected itself are used as they are.
        export_dir: where rank 0 writes the compacted model with `save_pruned` (atomically); default
            `<trainer.log_dir>/rku/model`.
        report_dir: where rank 0 writes report.json / report.md / plots after every round (default
            `<trainer.log_dir>/rku`), and
            generations/round-N.jsonl: every validation answer (task, question index, gold and extracted
            answers, correct, tokens, text), gathered from all ranks.
        compact_at_end: remove masked structures physically after the last round.
        seed: seeds every round (RNG streams and LoRA adapter re-initialisation), for resumable runs,
            and a named importance.
        model_attr: the LightningModule attribute that holds the Hugging Face model; it also names the
            callback's checkpoint state (`state_key`), so two instances pruning two attributes coexist.
    """

    def __init__(
        self,
        target_sparsity: float = 0.4,
        rounds: int = 4,
        schedule: Schedule = "cubic",
        importance: str | Importance = "rku",
        objective: ObjectiveName = "ce",
        allocation: Allocation = "uniform",
        attention: Attention = "groups",
        min_mlp_keep: float = 0.1,
        calibration_batches: int = 32,
        recovery_steps: int = 200,
        lora: dict[str, Any] | None = DEFAULT_LORA,
        export_dir: str | None = None,
        report_dir: str | None = None,
        compact_at_end: bool = True,
        micro_batch_size: int | None = None,
        seed: int = 0,
        checkpoint_layers: bool = False,
        model_attr: str = "model",
    ):
        check_schedule(target_sparsity, rounds, schedule)
        self.settings = PruningSettings(
            importance, allocation, objective, attention, min_mlp_keep, micro_batch_size, seed, checkpoint_layers
        )
        self.target_sparsity = float(target_sparsity)
        self.rounds = rounds
        self.schedule = schedule
        self.calibration_batches = positive_int("calibration_batches", calibration_batches)
        self.recovery_steps = positive_int("recovery_steps", recovery_steps)
        self.lora = None if lora is None else LoRASettings.from_mapping(lora, "lora")
        self.export_dir = Path(export_dir) if export_dir else None
        self.report_dir = Path(report_dir) if report_dir else None
        self.compact_at_end = compact_at_end
        if not isinstance(model_attr, str) or not model_attr.isidentifier():
            raise ValueError(f"model_attr must be an attribute name, got {model_attr!r}")
        self.model_attr = model_attr
        #: Recovery steps and calibration batches this fit uses: fewer under fast_dev_run / limit_train_batches.
        self._steps = self.recovery_steps
        self._calibration = self.calibration_batches
        self._dry_run = False
        self._trainable: set[str] | None = None

        self.pruner: StructuredPruner | None = None
        self._start_sparsity = 0.0
        self.round = 0
        self.phase = "calibrate"
        self.records: list[dict] = []
        self._current: dict = {}
        self._pending_state: dict | None = None
        self._clock = 0.0
        self._eval_clock = 0.0
        self._scalars_due = False
        self.plan: dict | None = None

    # -- contract and setup ----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(model_attr=self.model_attr)

    def hf_model(self, pl_module: LightningModule) -> torch.nn.Module:
        """The module's Hugging Face causal LM (`pl_module.<model_attr>`), or a clear error."""
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, torch.nn.Module) or not hasattr(unwrap_model(model), "config"):
            raise TypeError(
                f"RKUPruning needs the LightningModule to expose its Hugging Face causal LM as `{self.model_attr}` "
                f"(model_attr); {type(pl_module).__name__}.{self.model_attr} is {type(model).__name__}. See docs/lightning.md."
            )
        try:
            get_family(model)
        except NotImplementedError as error:
            raise TypeError(f"RKUPruning: {type(pl_module).__name__}.{self.model_attr}: {error}") from error
        return unwrap_model(model)

    @property
    def finished(self) -> bool:
        """Whether this callback's run is over (all rounds, or stopped early); it prunes nothing more."""
        return self.phase in ("done", "stopped")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = self.hf_model(pl_module)
        _check_strategy(trainer)
        if self.finished:
            if stage == "fit":
                raise RuntimeError(
                    f"RKUPruning: this callback already ran its {self.round}/{self.rounds} rounds (phase {self.phase}) and "
                    f"the module holds the result; a second fit with it is refused. Fit without it to fine-tune the "
                    "pruned model, or pass a new RKUPruning to prune further (it starts from the current sparsity)."
                )
            return  # validate/test/predict use the module as it is: masks stay, nothing is re-attached
        if stage != "fit":  # validate prepares in `on_validation_start`, once a ckpt_path is restored; test/predict: nothing
            return
        if trainer.world_size > self.calibration_batches:
            raise ValueError(
                f"calibration_batches={self.calibration_batches} leaves some of the {trainer.world_size} ranks "
                "without a calibration batch; use at least one per rank"
            )
        self._ensure_pruner(trainer, model)
        self._check_target()
        limit = trainer.limit_train_batches  # an int counts batches (1 is one batch), a float is a fraction
        self._dry_run = bool(trainer.fast_dev_run) or isinstance(limit, int) or limit != 1.0
        self._steps = 1 if self._dry_run else self.recovery_steps
        self._calibration = trainer.world_size if self._dry_run else self.calibration_batches
        self.export_dir = self.export_dir or Path(trainer.log_dir or trainer.default_root_dir) / "rku" / "model"
        self.report_dir = self.report_dir or Path(trainer.log_dir or trainer.default_root_dir) / "rku"
        if self.compact_at_end and not self._dry_run and trainer.is_global_zero:
            check_export_target(self.export_dir, overwrite=True)  # an unusable folder fails now, not after training
        if self.lora is not None and not has_lora(model):
            # Injection freezes the base weights; the end of the run unfreezes what was trainable before.
            self._trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            inject_lora(model, self.lora)
        self._take_over_loop(trainer)
        self.pruner.gates.attach()  # adapters injected since creation are gated as a whole
        if self._pending_state is not None:
            self._apply_state(self._pending_state)

    def _check_target(self) -> None:
        assert self.pruner is not None
        # A pruned export starts part-way: the schedule runs from its sparsity (against the dense model) to the target.
        if self.round == 0 and self.target_sparsity <= self._start_sparsity:
            raise ValueError(
                f"target_sparsity={self.target_sparsity} is not above the {self._start_sparsity:.4f} of the dense "
                "model that this (already pruned) model has removed; raise target_sparsity"
            )
        self.pruner.check_reachable(self.target_sparsity, "target_sparsity")

    def _ensure_pruner(self, trainer: Trainer, model: torch.nn.Module) -> None:
        if self.pruner is None:
            # Before LoRA injection: the engine counts the parameters it sees at creation as the model's size.
            # Outside inference mode (validate runs in it): fit edits the masks in place.
            with torch.inference_mode(False):
                self.pruner = StructuredPruner.from_settings(model, self.settings, progress=_show_progress(trainer))
            self._start_sparsity = self.pruner.sparsity()

    def _take_over_loop(self, trainer: Trainer) -> None:
        """Run length and validation cadence follow the rounds; say so when the Trainer said otherwise."""
        max_steps = self.rounds * self._steps
        interval = self._steps * trainer.accumulate_grad_batches
        if self._dry_run:
            rank_zero_info(
                f"RKUPruning: fast_dev_run / limit_train_batches: {self.rounds} rounds of 1 recovery step, calibration "
                f"on {self._calibration} batch(es), no export or reports (a check of the pipeline, not a pruned model)"
            )
        elif (trainer.max_steps not in (-1, max_steps) or trainer.val_check_interval not in (None, 1.0, interval)
              or trainer.max_epochs not in (None, -1, 1000)):  # 1000: Lightning's default when neither is set
            rank_zero_info(
                f"RKUPruning sets max_steps={max_steps}, max_epochs=-1 and val_check_interval={interval} "
                f"(rounds x recovery_steps); the Trainer's max_steps={trainer.max_steps}, max_epochs={trainer.max_epochs} "
                f"and val_check_interval={trainer.val_check_interval} are replaced"
            )
        trainer.fit_loop.epoch_loop.max_steps = max_steps
        trainer.fit_loop.max_epochs = -1
        trainer.val_check_interval = interval
        trainer.check_val_every_n_epoch = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not sum(trainer.num_val_batches) and not trainer.reload_dataloaders_every_n_epochs:
            # No validation to pace (the loaders are set up by now): Lightning's default again, so that a ModelCheckpoint
            # saves at train-epoch ends as in any run without validation (with None it waits for validation ends).
            # Not with reloaded loaders: a reload would check val_check_interval against a short train loader again.
            trainer.check_val_every_n_epoch = 1
        optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [p for p in lora_parameters(self.hf_model(pl_module)) if id(p) not in optimized]
        if missing:
            raise ValueError(
                f"{len(missing)} LoRA parameters are not in any optimizer: configure_optimizers must optimize the "
                "parameters that require gradients after setup (RKUPruning injects LoRA adapters at setup)"
            )

    # -- the phase machine -----------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.phase == "evaluate":  # the round ended without a validation run (no val loader)
            self._finish_round(trainer, {})
        if self.phase == "calibrate" and self.round < self.rounds:
            self._start_round(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.phase == "recover" and trainer.global_step >= self.round * self._steps:
            self._end_recovery(trainer, pl_module)

    def _start_round(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.pruner is not None
        self.round += 1
        seed_everything(self.settings.seed + self.round, verbose=False)
        progress = sparsity_at(self.round, self.target_sparsity, self.rounds, self.schedule) / self.target_sparsity
        target = self._start_sparsity + (self.target_sparsity - self._start_sparsity) * progress
        start = time.perf_counter()
        self.pruner.reset()
        batches, source = self._calibration_batches(trainer, pl_module)
        self.pruner.calibrate(batches)
        self.pruner.stats.all_reduce_()
        report = self.pruner.prune(target)
        self._check_masks_agree(trainer, pl_module)
        self._current = {**self._structure_record(self.round, report), "time_calibrate_prune_s": time.perf_counter() - start}
        if source is not None:
            self._current["calibration"] = dict(source)
        self._log_prune(trainer, report)
        self.phase = "recover"
        reset_peak_memory(pl_module.device)
        self._clock = time.perf_counter()

    def _end_recovery(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._current["time_recover_s"] = time.perf_counter() - self._clock
        steps = max(trainer.global_step - (self.round - 1) * self._steps, 1)
        self._current["time_per_step_s"] = self._current["time_recover_s"] / steps
        memory = memory_snapshot(pl_module.device)
        self._current["recover_peak_memory_bytes"], self._current["memory_kind"] = memory["peak_bytes"], memory["kind"]
        model = self.hf_model(pl_module)
        if has_lora(model):
            merge_and_reinit_(model, seed=self._adapter_seed())
            reset_optimizer_state_(trainer.optimizers, lora_parameters(model))
        self.phase = "evaluate"

    def _adapter_seed(self) -> int:
        return self.settings.seed * 1_000_003 + self.round

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The validation of the epoch's last step has run by now, so a round still in `evaluate` gets none: it ends
        # here, and the last round is compacted before a ModelCheckpoint saves at train-epoch end (it runs after us).
        if self.phase == "evaluate":
            self._finish_round(trainer, {})

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_clock = time.perf_counter()
        if trainer.state.fn == "validate" and self.pruner is None and not self.finished:
            self._prepare_baseline(trainer, self.hf_model(pl_module))

    def _prepare_baseline(self, trainer: Trainer, model: torch.nn.Module) -> None:
        """`trainer.validate` before fit, after any `ckpt_path` is restored: the dense model becomes round 0 of the
        report and a target it cannot reach fails now, before compute. An already pruned model (the module after a
        run, an export, a final checkpoint) is measured as it is: gates on it would be all ones, hooks for nothing."""
        if is_compacted(model):
            rank_zero_info("RKUPruning: the model is already pruned (compacted, with its pruning plan); validate measures "
                           "it as it is, attaching nothing; fit with this callback prunes it further from its sparsity")
            return
        self._ensure_pruner(trainer, model)
        self._check_target()

    def _measures(self, trainer: Trainer) -> bool:
        """Whether this validation is a round's (or the dense model's) for this callback."""
        return not trainer.sanity_checking and self.pruner is not None and not (self.finished and not self.records)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._scalars_due = self._measures(trainer)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._scalars_due:
            return
        # Run-level scalars, logged once per validation at its first batch: Lightning lists what is logged during a
        # dataloader's batches under that dataloader only, and what is logged at epoch end under every dataloader.
        # Every rank holds the same masks, so no sync is needed. `prune/round` (mode max) is what a ModelCheckpoint
        # monitors to keep the final, compacted model: val/* of rounds at different sparsities do not rank.
        self._scalars_due = False
        pl_module.log("prune/sparsity", self.sparsity(), batch_size=1, add_dataloader_idx=False)
        pl_module.log("prune/round", float(self.round), batch_size=1, add_dataloader_idx=False)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._measures(trainer):
            self._write_generations(trainer, getattr(pl_module, "validation_generations", []))

    def _write_generations(self, trainer: Trainer, rows: list[dict]) -> None:
        """Every validation answer of this round, so that an accuracy can be read, not only trusted."""
        if self.report_dir is None or self._dry_run:
            return
        if trainer.world_size > 1:  # each rank generated for its own shard of the questions
            shards: list[list[dict] | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(shards, rows)
            rows = [row for shard in shards for row in shard]
        if rows and trainer.is_global_zero:
            lines = "".join(json.dumps(row) + "\n" for row in sorted(rows, key=lambda r: (r["task"], r["index"])))
            write_text_atomic(self.report_dir / "generations" / f"round-{self.round}.jsonl", lines)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(METRIC_PREFIXES) and v.numel() == 1
        }
        if self.phase == "evaluate":
            self._finish_round(trainer, metrics)
        elif self.round == 0 and trainer.state.fn == "validate" and self.pruner is not None:
            # trainer.validate before fit: the dense model's row of the report.
            baseline = {
                **self._structure_record(0, self.pruner.report(target_sparsity=0.0)),
                "time_evaluate_s": time.perf_counter() - self._eval_clock,
                "metrics": metrics,
            }
            self.records = [r for r in self.records if r["round"] != 0] + [baseline]
            self._write_reports(trainer)

    def _finish_round(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._current["time_evaluate_s"] = time.perf_counter() - self._eval_clock if metrics else 0.0
        self._current["metrics"] = metrics
        self.records.append(self._current)
        self._current = {}
        self.phase = "calibrate"
        rank_zero_info(f"RKUPruning: round {self.round}/{self.rounds} done: " + _format_metrics(metrics))
        if self.round == self.rounds:
            # Before ModelCheckpoint saves this round (it runs after every other callback): its file holds the result.
            self._finish_run(trainer, trainer.lightning_module, "done")
        else:
            self._write_reports(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.phase == "recover":  # trainer.should_stop in the middle of a round: close it as it is
            self._end_recovery(trainer, pl_module)
        if self.phase == "evaluate":  # the round ended without a validation run
            self._finish_round(trainer, {})
        if not self.finished:  # trainer.should_stop (EarlyStopping, a user's callback) before the last round
            self._finish_run(trainer, pl_module, "stopped")

    def _finish_run(self, trainer: Trainer, pl_module: LightningModule, phase: str) -> None:
        """Leave a plain Hugging Face model in the module: adapters folded in, compacted, no hooks; export it.

        A run stopped before its last round is exported as far as it got, marked `reached_target: false`.
        """
        self.phase = phase
        model = self.hf_model(pl_module)
        reached = phase == "done"
        sparsity = self.sparsity()
        if not reached:
            rank_zero_warn(
                f"RKUPruning: training stopped after round {self.round}/{self.rounds} at sparsity {sparsity:.4f}, short of "
                f"target_sparsity={self.target_sparsity}; "
                + ("what was reached is compacted and exported, marked reached_target=false" if self.round and self.compact_at_end
                   else "nothing was pruned, so nothing is exported" if not self.round else "the model keeps its masks")
            )
        if has_lora(model):
            remove_lora_(model)
        if self._trainable is not None:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name in self._trainable)
        if not self.compact_at_end or self.round == 0 or self.pruner is None:
            if self.round == 0 and self.pruner is not None:  # nothing pruned: no hooks left on the model
                self.pruner.gates.detach()
                del model.rku_gates
            self._write_reports(trainer)
            return
        self.plan = compact(model)
        if self._dry_run:
            rank_zero_info("RKUPruning: fast_dev_run / limit_train_batches: the compacted model is not exported")
        elif self.export_dir is not None:
            if trainer.is_global_zero:
                metadata = {"rku_lightning_rounds": self.records, "schedule": self.schedule, "target": self.target_sparsity,
                            "reached_target": reached, "rounds_completed": self.round, "rounds_planned": self.rounds}
                save_pruned(model, getattr(pl_module, "tokenizer", None), self.export_dir, overwrite=True, metadata=metadata)
                rank_zero_info(f"RKUPruning: exported the compacted model to {self.export_dir}")
            trainer.strategy.barrier("rku_export")
        self._write_reports(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        plan = getattr(self.hf_model(pl_module), "rku_pruning_plan", None)
        if plan is not None:  # compacted (the last round's checkpoint, or a run that started from an export)
            checkpoint.setdefault(PLANS_KEY, {})[self.model_attr] = plan

    # -- calibration data and DDP agreement ------------------------------------------------------
    def _calibration_batches(self, trainer: Trainer, pl_module: LightningModule) -> tuple[list[dict], dict | None]:
        """This rank's share of the first `calibration_batches` batches, and what they were built from when their
        maker says so (its `calibration_info` after the call: e.g. how many of the current model's traces were right)."""
        rank, world = trainer.global_rank, trainer.world_size
        for holder in (trainer.datamodule, pl_module):
            make = getattr(holder, "calibration_dataloader", None)
            if callable(make):
                batches = self._checked(_take(make(), range(rank, self._calibration, world)), rank, world)
                return batches, getattr(holder, "calibration_info", None)
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple, dict)):
            raise ValueError(
                "RKUPruning: several train loaders; give the datamodule a calibration_dataloader() to calibrate on"
            )
        # Lightning already shards the train loader across ranks: take this rank's count from its own shard.
        return self._checked(_take(loader, range(len(range(rank, self._calibration, world)))), rank, world), None

    def _checked(self, batches: list[dict], rank: int, world: int) -> list[dict]:
        expected = len(range(rank, self._calibration, world))
        if len(batches) < expected:
            rank_zero_warn(f"RKUPruning: calibration_batches={self._calibration} but the loader ran out after fewer")
        return batches

    def _check_masks_agree(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size == 1:
            return
        assert self.pruner is not None
        gates = self.pruner.gates
        flat = torch.cat([m.flatten().float().cpu() for m in gates.mlp + gates.heads]).to(pl_module.device)
        gathered = trainer.strategy.all_gather(flat)
        if not bool((gathered == gathered[0]).all()):
            differ = [i for i in range(gathered.shape[0]) if not torch.equal(gathered[i], gathered[0])]
            raise RuntimeError(
                f"RKUPruning: ranks {differ} hold different masks than rank 0 after round {self.round}; "
                "the statistics all-reduce or the model weights diverged across ranks"
            )

    # -- records, logging, state -----------------------------------------------------------------
    @staticmethod
    def _structure_record(round_index: int, report: PruneReport) -> dict:
        return {
            "round": round_index,
            "target_sparsity": report.target_sparsity,
            "sparsity": report.sparsity,
            "total_sparsity": report.total_sparsity,
            "params": report.total_params_after,
            "decoder_params": report.decoder_params_after,
            "kv_cache_bytes_per_token": report.kv_cache_bytes_per_token_after,
            # The dense sizes, known without evaluating the dense model (which a run may skip).
            "dense_params": report.total_params_before,
            "dense_kv_cache_bytes_per_token": report.kv_cache_bytes_per_token_before,
            "layers": [vars(layer).copy() for layer in report.layers],
        }

    def _log_prune(self, trainer: Trainer, report: PruneReport) -> None:
        rank_zero_info(f"RKUPruning: round {self.round}/{self.rounds} pruned\n{report.summary()}")
        values = {
            "prune/round": float(self.round),
            "prune/target_sparsity": report.target_sparsity,
            "prune/sparsity": report.sparsity,
            "prune/params": float(report.total_params_after),
            "prune/kv_cache_bytes_per_token": float(report.kv_cache_bytes_per_token_after),
        }
        for layer in report.layers:
            values[f"prune/layer_{layer.layer:02d}/mlp_kept"] = layer.mlp_channels / layer.mlp_channels_total
            values[f"prune/layer_{layer.layer:02d}/kv_groups_kept"] = layer.kv_groups / layer.kv_groups_total
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def _write_reports(self, trainer: Trainer) -> None:
        if self.report_dir is None or self._dry_run or not trainer.is_global_zero:
            return
        from rku_lightning.training.reporting import write_reports

        write_reports(self.records, self.report_dir, run=self.summary())

    def summary(self) -> dict:
        """The run's settings, as written at the top of report.json."""
        return {
            "target_sparsity": self.target_sparsity,
            "rounds": self.rounds,
            "schedule": self.schedule,
            "importance": self.settings.importance_name,
            "objective": self.settings.objective,
            "allocation": self.settings.allocation,
            "attention": self.settings.attention,
            "calibration_batches": self.calibration_batches,
            "recovery_steps": self.recovery_steps,
            "lora": None if self.lora is None else vars(self.lora).copy(),
            "export_dir": str(self.export_dir) if self.export_dir else None,
            "phase": self.phase,
        }

    def progress_info(self) -> dict[str, str]:
        """Round, phase and current sparsity, for the progress bar."""
        return {"round": f"{self.round}/{self.rounds}", "phase": self.phase, "sparsity": f"{self.sparsity():.3f}"}

    def sparsity(self) -> float:
        """The model's current sparsity (after the run: the last round's, as the masks left with compaction)."""
        if self.finished and self.records:
            return float(self.records[-1]["sparsity"])
        return float(self.pruner.sparsity()) if self.pruner is not None else 0.0

    def resume_settings(self) -> dict[str, Any]:
        """The `RESUME_FIELDS` of this callback: a checkpoint made with other values is refused."""
        values = {**self.summary(), "min_mlp_keep": self.settings.min_mlp_keep, "seed": self.settings.seed,
                  "model_attr": self.model_attr}
        return {k: values[k] for k in RESUME_FIELDS}

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "phase": self.phase,
            "records": self.records,
            "current": self._current,
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "settings": self.resume_settings(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after `setup`; a state loaded earlier waits for the pruner.
        if self.pruner is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state["phase"] not in PHASES:
            raise ValueError(f"RKUPruning state: unknown phase {state['phase']!r}")
        saved, mine = state.get("settings", {}), self.resume_settings()
        differ = [k for k in RESUME_FIELDS if k in saved and saved[k] != mine[k]]
        if differ:
            raise ValueError(
                "RKUPruning: the checkpoint was written with other settings: "
                + ", ".join(f"{k}={saved[k]!r} (this callback: {mine[k]!r})" for k in differ)
                + "; resume with the checkpoint's settings, or start a new run without ckpt_path"
            )
        if state["phase"] in ("done", "stopped"):
            raise ValueError(
                f"RKUPruning: the checkpoint holds a finished run (phase {state['phase']}); there is nothing to resume. "
                "Load it with YourModule.load_from_checkpoint (see restore_pruned_shapes), or start a new run"
            )
        if state["phase"] in ("recover", "evaluate"):
            rank_zero_warn(
                f"RKUPruning: resuming in round {state['round']} phase {state['phase']}, not at a round end: "
                + ("the rest of the round's recovery continues, but the run will not match an uninterrupted one exactly "
                   "(dropout and data order of the resumed steps)" if state["phase"] == "recover"
                   else "the round's validation does not run again, so its metrics are missing from the report")
                + "; round-end checkpoints (written when a round's validation ends) resume exactly"
            )
        self.round, self.phase = int(state["round"]), state["phase"]
        self.records = list(state["records"])
        self._current = dict(state["current"])
        if state["pruner"] is not None and self.pruner is not None:
            self.pruner.load_state_dict(state["pruner"])
        self._pending_state = None
        self._clock = time.perf_counter()


def restore_pruned_shapes(pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
    """Call from `on_load_checkpoint`: slice the module's models to the shapes of a pruned checkpoint.

    A module built from its hyperparameters (`load_from_checkpoint`, `trainer.test(ckpt_path=...)` with a
    fresh module) holds the dense model; the final checkpoint of an `RKUPruning` run holds the compacted one
    and its plan (`checkpoint["rku_pruning_plans"]`), so the shapes must be rebuilt before the weights load.
    """
    for attr, plan in checkpoint.get(PLANS_KEY, {}).items():
        model = getattr(pl_module, attr, None)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"restore_pruned_shapes: the checkpoint prunes `{attr}`, which {type(pl_module).__name__} does not have")
        conform_to_plan(model, plan)


def _show_progress(trainer: Trainer) -> bool:
    """Calibration bars follow the Trainer's: shown on rank 0 when it shows a progress bar."""
    return trainer.is_global_zero and trainer.progress_bar_callback is not None


def _check_strategy(trainer: Trainer) -> None:
    """Single device and DDP (one process per device, e.g. torchrun or Lightning's `ddp`) only.

    Sharded strategies (FSDP, DeepSpeed) split the weights that gates, merges and compaction edit in
    place; spawned DDP hands rank 0's weights back to a main process whose model was never compacted.
    """
    strategy = trainer.strategy
    if isinstance(strategy, SingleDeviceStrategy):
        return
    if isinstance(strategy, DDPStrategy) and getattr(strategy, "_start_method", "popen") == "popen":
        return
    raise ValueError(
        f"strategy: RKUPruning supports single-device and DDP (`strategy='ddp'`, torchrun) training, not "
        f"{type(strategy).__name__}{' with spawned processes' if isinstance(strategy, DDPStrategy) else ''}; "
        "see docs/lightning.md"
    )


def _take(loader: Any, positions: range) -> list[dict]:
    """The batches of `loader` at `positions` (an increasing range), stopping early at the loader's end."""
    wanted, batches = set(positions), []
    last = positions[-1] if len(positions) else -1
    for index, batch in enumerate(loader):
        if index > last:
            break
        if index in wanted:
            if not isinstance(batch, dict):
                raise ValueError(f"calibration batches must be dicts with input_ids/attention_mask, got {type(batch).__name__}")
            batches.append(batch)
    return batches


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if math.isfinite(v)) or "no validation metrics"


class RKUProgressBar(TQDMProgressBar):
    """The TQDM bar plus round, phase and current sparsity of the run's `RKUPruning` callback."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        for callback in trainer.callbacks:
            if isinstance(callback, RKUPruning):
                items.update(callback.progress_info())
        return items
