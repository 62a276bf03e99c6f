"""RKUPruning with a user's own LightningModule on tiny models: phases, schedule, records, contract, errors."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import VOCAB, LowIndexFirst, tiny_batches, tiny_model
from torch.utils.data import DataLoader

from rku_lightning import load_pruned
from rku_lightning.callbacks import RKUProgressBar, RKUPruning
from rku_lightning.pruning.schedules import sparsity_schedule
from rku_lightning.training.datamodule import ReasoningDataModule, RecoveryStream, stream_position
from rku_lightning.training.lora import has_lora

LORA = dict(r=2, alpha=4, dropout=0.0)


class TinyLM(L.LightningModule):
    """A user's module: the Hugging Face model as `model`, its own loss, optimizer over what requires grad."""

    def __init__(self, family: str = "llama", seed: int = 0, lr: float = 1e-2):
        super().__init__()
        self.model = tiny_model(family, seed)
        self.lr = lr

    def _loss(self, batch):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss

    def on_train_start(self):
        self.model.train()  # the fixture builds it in eval mode; LoRA dropout needs train mode

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class TokenData(L.LightningDataModule):
    """Random tokens: a resumable, rank-aware train stream, fixed calibration and validation batches."""

    def __init__(self, batch_size: int = 2, seq_len: int = 12, calibration: bool = True, validation: bool = True):
        super().__init__()
        gen = torch.Generator().manual_seed(123)
        self.items = list(torch.randint(3, VOCAB, (64, seq_len), generator=gen))
        self.batch_size = batch_size
        self.calibration = calibration
        self.validation = validation

    def train_dataloader(self):
        stream = RecoveryStream(
            self.items,
            lambda ids: {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            self.batch_size,
            pad_token_id=0,
            seed=0,
            position=lambda: stream_position(self.trainer),
        )
        return DataLoader(stream, batch_size=None)

    def calibration_dataloader(self):
        if not self.calibration:
            raise AttributeError
        return tiny_batches(8, batch_size=2, seed=1)

    def val_dataloader(self):
        return DataLoader(tiny_batches(2, batch_size=2, seed=2) if self.validation else [], batch_size=None)


class NoCalibration(TokenData):
    calibration_dataloader = None  # type: ignore[assignment]


def make_trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def pruning(**kwargs) -> RKUPruning:
    defaults = dict(target_sparsity=0.4, rounds=3, calibration_batches=4, recovery_steps=2, lora=LORA)
    return RKUPruning(**{**defaults, **kwargs})


class PhaseProbe(L.Callback):
    """Records (global_step, round, phase) as the training loop sees them, after RKUPruning's hooks."""

    def __init__(self, rku: RKUPruning):
        self.rku = rku
        self.seen: list[tuple[int, int, str]] = []
        self.validations: list[tuple[int, int, str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, self.rku.round, self.rku.phase))

    def on_validation_start(self, trainer, pl_module):
        self.validations.append((trainer.global_step, self.rku.round, self.rku.phase))


def test_rounds_follow_the_schedule_and_phases(tmp_path):
    rku = pruning(compact_at_end=False)
    probe = PhaseProbe(rku)
    trainer = make_trainer(tmp_path, [rku, probe])
    trainer.fit(TinyLM(), TokenData())
    assert trainer.global_step == 6 and trainer.max_steps == 6
    assert probe.seen == [(0, 1, "recover"), (1, 1, "recover"), (2, 2, "recover"), (3, 2, "recover"), (4, 3, "recover"), (5, 3, "recover")]
    assert probe.validations == [(2, 1, "evaluate"), (4, 2, "evaluate"), (6, 3, "evaluate")]
    assert rku.phase == "done" and [r["round"] for r in rku.records] == [1, 2, 3]
    targets = sparsity_schedule(0.4, 3, "cubic")
    for record, target in zip(rku.records, targets):
        assert record["target_sparsity"] == pytest.approx(target)
        assert record["sparsity"] == pytest.approx(target, abs=0.02)
        assert set(record["metrics"]) == {"val/loss"}
        assert record["time_calibrate_prune_s"] > 0 and record["time_recover_s"] > 0 and record["time_evaluate_s"] > 0
    # Masks only ever shrink, and the LoRA adapters are merged (B = 0) after every round.
    history = rku.pruner.history
    for before, after in zip(history, history[1:]):
        assert all(b.mlp_channels >= a.mlp_channels for b, a in zip(before.layers, after.layers))
    # compact_at_end=False: the adapters are folded in at the end, the masks stay on the dense model.
    assert not has_lora(trainer.lightning_module.model) and trainer.lightning_module.model.rku_gates is rku.pruner.gates
    assert trainer.callback_metrics["prune/sparsity"] == pytest.approx(rku.records[-1]["sparsity"])
    assert trainer.callback_metrics["prune/round"] == 3 and "sparsity" not in trainer.callback_metrics


def test_compacts_and_exports_at_the_end(tmp_path):
    rku = pruning(rounds=2, export_dir=str(tmp_path / "model"), report_dir=str(tmp_path / "report"))
    trainer = make_trainer(tmp_path, [rku])
    module = TinyLM("qwen2")
    trainer.fit(module, TokenData())
    model = module.model
    assert not has_lora(model) and getattr(model, "rku_gates", None) is None
    assert sum(p.numel() for p in model.parameters()) == rku.records[-1]["params"]
    loaded, _ = load_pruned(tmp_path / "model")
    batch = tiny_batches(1, seed=5)[0]
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    for name in ("report.json", "report.md", "sparsity_curve.png", "layer_profile.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_a_users_importance_plugs_in_through_the_callback(tmp_path):
    scorer = LowIndexFirst()
    rku = pruning(rounds=1, importance=scorer, attention="none", report_dir=str(tmp_path / "report"))
    make_trainer(tmp_path, [rku]).fit(TinyLM(), TokenData())
    assert rku.pruner.importance is scorer and rku.summary()["importance"] == "low_index_first"
    channels = tiny_model("llama").config.intermediate_size
    for layer in rku.plan["layers"]:
        kept = layer["mlp_channels"]
        assert len(kept) < channels and kept == list(range(channels - len(kept), channels))


def test_an_importance_class_path_builds_the_users_scorer():
    """How a config names its own scorer: `importance: {class_path: ..., init_args: ...}`."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(RKUPruning, "pruning")
    config = parser.parse_args(['--pruning.importance={"class_path": "conftest.LowIndexFirst", "init_args": {"seed": 3}}'])
    rku = parser.instantiate_classes(config).pruning
    assert type(rku.settings.importance) is LowIndexFirst and rku.settings.importance.seed == 3
    assert parser.instantiate_classes(parser.parse_args([])).pruning.settings.importance == "rku"


class DescribedData(TokenData):
    """Says what each calibration call's batches were built from, as `ReasoningDataModule` does for its traces."""

    calls = 0

    def calibration_dataloader(self):
        self.calls += 1
        self.calibration_info = {"source": "current", "traces": 4, "correct": self.calls - 1, "stopped": 4 - self.calls}
        return super().calibration_dataloader()


def test_each_round_records_what_its_own_calibration_call_was_built_from(tmp_path):
    rku = pruning(compact_at_end=False, report_dir=tmp_path / "report")
    make_trainer(tmp_path, [rku]).fit(TinyLM(), DescribedData())
    assert [r["calibration"] for r in rku.records] == [
        {"source": "current", "traces": 4, "correct": n, "stopped": 3 - n} for n in range(3)
    ]
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| calibration traces |" in table and "| 2/4 right, 1 cut |" in table
    plain = pruning(rounds=1, compact_at_end=False, report_dir=tmp_path / "plain")
    make_trainer(tmp_path, [plain]).fit(TinyLM(), TokenData())
    assert "calibration" not in plain.records[0] and "calibration traces" not in (tmp_path / "plain" / "report.md").read_text()


def test_calibrates_from_the_train_loader_without_calibration_dataloader(tmp_path):
    rku = pruning(rounds=1, compact_at_end=False)
    make_trainer(tmp_path, [rku]).fit(TinyLM(), NoCalibration())
    assert rku.pruner.stats.num_samples() == 4 * 2  # 4 batches of the train stream, 2 samples each
    assert rku.records[0]["sparsity"] == pytest.approx(0.4, abs=0.02)


def test_rounds_advance_without_a_validation_loop(tmp_path):
    rku = pruning(rounds=2, compact_at_end=False)
    make_trainer(tmp_path, [rku], limit_val_batches=0).fit(TinyLM(), TokenData())
    assert rku.phase == "done" and [r["metrics"] for r in rku.records] == [{}, {}]


def test_dense_baseline_from_validate_before_fit(tmp_path):
    rku = pruning(rounds=1, compact_at_end=False)
    trainer = make_trainer(tmp_path, [rku])
    module, data = TinyLM(), TokenData()
    trainer.validate(module, data, verbose=False)
    trainer.fit(module, data)
    assert [r["round"] for r in rku.records] == [0, 1]
    assert rku.records[0]["sparsity"] == 0 and "val/loss" in rku.records[0]["metrics"]
    assert rku.records[0]["time_evaluate_s"] > 0


def test_progress_bar_shows_round_phase_sparsity(tmp_path):
    rku = pruning(rounds=1, compact_at_end=False)
    bar = RKUProgressBar()
    trainer = make_trainer(tmp_path, [rku, bar], enable_progress_bar=True)
    trainer.fit(TinyLM(), TokenData())
    metrics = bar.get_metrics(trainer, trainer.lightning_module)
    assert metrics["round"] == "1/1" and metrics["phase"] == "done" and float(metrics["sparsity"]) > 0.3


# -- contract and configuration errors -------------------------------------------------------------


class NoModel(TinyLM):
    """Keeps its Hugging Face model under another name."""

    def __init__(self):
        super().__init__()
        self.net = self.model
        del self.model


class WrongOptimizer(TinyLM):
    def configure_optimizers(self):
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)


class StepCounter(L.Callback):
    steps = 0

    def on_train_batch_end(self, *args):
        StepCounter.steps += 1


def test_module_without_model_fails_at_setup(tmp_path):
    with pytest.raises(TypeError, match="expose its Hugging Face causal LM as `model`"):
        make_trainer(tmp_path, [pruning()]).fit(NoModel(), TokenData())


def test_lora_outside_the_optimizer_fails_before_training(tmp_path):
    StepCounter.steps = 0
    with pytest.raises(ValueError, match="configure_optimizers"):
        make_trainer(tmp_path, [pruning(), StepCounter()]).fit(WrongOptimizer(), TokenData())
    assert StepCounter.steps == 0


def test_unreachable_target_fails_at_setup(tmp_path):
    StepCounter.steps = 0
    with pytest.raises(ValueError, match="target_sparsity=0.9 is unreachable"):
        make_trainer(tmp_path, [pruning(target_sparsity=0.9, min_mlp_keep=0.5), StepCounter()]).fit(TinyLM(), TokenData())
    assert StepCounter.steps == 0


def test_an_export_dir_that_cannot_take_the_export_fails_at_setup(tmp_path):
    StepCounter.steps = 0
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("not an export")
    with pytest.raises(FileExistsError, match="not an rku_lightning export"):
        make_trainer(tmp_path, [pruning(export_dir=str(tmp_path / "data")), StepCounter()]).fit(TinyLM(), TokenData())
    assert StepCounter.steps == 0 and (tmp_path / "data" / "keep.txt").read_text() == "not an export"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(rounds=0), "rounds"),
        (dict(target_sparsity=1.2), "target_sparsity"),
        (dict(schedule="exp"), "schedule"),
        (dict(importance="entropy"), "importance"),
        (dict(objective="mse"), "objective"),
        (dict(allocation="layerwise"), "allocation"),
        (dict(calibration_batches=0), "calibration_batches"),
        (dict(recovery_steps=0), "recovery_steps"),
        (dict(lora=dict(r=0)), "lora.r"),
        (dict(min_mlp_keep=1.0), "min_mlp_keep"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        pruning(**kwargs)


def test_missing_recovery_data_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="train_data"):
        ReasoningDataModule(train_data=str(tmp_path / "missing" / "train.jsonl"))
    with pytest.raises(ValueError, match="ood_task"):
        ReasoningDataModule(ood_task="mmlu")


def test_spawned_ddp_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [pruning()], strategy="ddp_spawn", devices=2)
    with pytest.raises(ValueError, match="strategy"):
        from rku_lightning.callbacks.rku_pruning import _check_strategy

        _check_strategy(trainer)


def test_mask_disagreement_across_ranks_fails_loudly():
    from types import SimpleNamespace

    from rku_lightning import StructuredPruner

    rku = pruning()
    rku.pruner = StructuredPruner(tiny_model("llama"), importance="magnitude", progress=False)
    rku.pruner.prune(0.2)
    strategy = SimpleNamespace(all_gather=lambda t: torch.stack([t, 1 - t]))
    trainer = SimpleNamespace(world_size=2, strategy=strategy)
    with pytest.raises(RuntimeError, match="ranks \\[1\\] hold different masks"):
        rku._check_masks_agree(trainer, SimpleNamespace(device=torch.device("cpu")))


def test_an_export_is_pruned_on_from_its_own_sparsity(tmp_path):
    """Starting from a 20 % export, the schedule runs from 0.2 to the target, counted against the dense model."""
    from rku_lightning import StructuredPruner, compact, save_pruned

    model = tiny_model("qwen2")
    pruner = StructuredPruner(model, importance="magnitude", progress=False)
    pruner.prune(0.2)
    start = pruner.sparsity()
    compact(model)
    save_pruned(model, None, tmp_path / "first")
    module = TinyLM("qwen2")
    module.model, _ = load_pruned(tmp_path / "first")
    with pytest.raises(ValueError, match="not above"):
        make_trainer(tmp_path, [pruning(target_sparsity=0.15)]).fit(module, TokenData())
    rku = pruning(rounds=2, export_dir=str(tmp_path / "again"))
    make_trainer(tmp_path, [rku]).fit(module, TokenData())
    targets = [start + (0.4 - start) * s / 0.4 for s in sparsity_schedule(0.4, 2, "cubic")]
    assert [r["target_sparsity"] for r in rku.records] == pytest.approx(targets)
    assert rku.records[-1]["sparsity"] == pytest.approx(0.4, abs=0.02)
    rounds = json.loads((tmp_path / "again" / "pruning.json").read_text())["rounds"]
    assert [r["target_sparsity"] for r in rounds] == pytest.approx([0.2, *targets])
