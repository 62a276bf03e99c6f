"""RKUPruning behaves like a built-in Lightning callback (issue 17): a plain compacted model after fit,
checkpoints that load with pruned shapes (also saved at train-epoch end without validation), fast_dev_run,
should_stop, resume checks, Trainer settings, each metric once in validate's table, nothing attached to a
model that is already pruned."""

from __future__ import annotations

import json
import logging
import re

import lightning as L
import pytest
import torch
from conftest import tiny_batches
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callback import NoModel, TinyLM, TokenData, make_trainer, pruning
from torch.utils.data import DataLoader

from rku_lightning import load_pruned
from rku_lightning.callbacks import RKUPruning, restore_pruned_shapes
from rku_lightning.training.lora import has_lora


class FullLM(TinyLM):
    """A user's module with every stage, that restores pruned shapes from a checkpoint (docs/lightning.md)."""

    def test_step(self, batch, batch_idx):
        """Lightning's test hook (not a pytest test): `trainer.test` logs the pruned model's loss through it."""
        self.log("test/loss", self._loss(batch), batch_size=batch["input_ids"].shape[0])

    def predict_step(self, batch, batch_idx):
        return self.model(**batch).logits

    def on_load_checkpoint(self, checkpoint):
        restore_pruned_shapes(self, checkpoint)


def held_out_loader(self) -> DataLoader:
    """The batches `trainer.test` runs after fit: the test-data hook of the DataModules below."""
    return DataLoader(tiny_batches(2, batch_size=2, seed=3), batch_size=None)


class EvalData(TokenData):
    test_dataloader = held_out_loader  # Lightning's test-data hook

    def predict_dataloader(self):
        return DataLoader(tiny_batches(1, batch_size=2, seed=4), batch_size=None)


def params(module: L.LightningModule) -> int:
    return sum(p.numel() for p in module.model.parameters())


def assert_plain(model: torch.nn.Module) -> None:
    """A plain Hugging Face model: no adapters, no gates, no forward hooks."""
    assert not has_lora(model) and getattr(model, "rku_gates", None) is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_validate_test_predict_and_a_new_trainer_after_fit(tmp_path):
    rku = pruning(rounds=2)
    trainer = make_trainer(tmp_path, [rku])
    module, data = FullLM(), EvalData()
    trainer.fit(module, data)
    assert_plain(module.model)
    assert rku.phase == "done"
    assert params(module) == rku.records[-1]["params"]
    val = trainer.validate(module, data, verbose=False)[0]
    assert val["prune/sparsity"] == pytest.approx(rku.records[-1]["sparsity"])
    assert trainer.test(module, data, verbose=False)[0]["test/loss"] > 0
    assert trainer.predict(module, data)[0].shape[-1] == module.model.config.vocab_size
    fresh = make_trainer(tmp_path / "fresh", [])
    assert fresh.validate(module, data, verbose=False)[0]["val/loss"] == pytest.approx(val["val/loss"], rel=1e-5)
    assert_plain(module.model)
    with pytest.raises(RuntimeError, match="second fit with it is refused"):
        trainer.fit(module, data)
    # Fine-tuning the pruned model goes on without the callback.
    make_trainer(tmp_path / "tune", [], max_steps=1).fit(module, data)


def test_the_final_checkpoint_loads_with_pruned_shapes(tmp_path):
    rku = pruning(rounds=2)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="prune/round", mode="max", save_last=True)
    trainer = make_trainer(tmp_path, [rku, best], enable_checkpointing=True)
    module, data = FullLM(), EvalData()
    trainer.fit(module, data)
    batch = tiny_batches(1, seed=5)[0]
    with torch.no_grad():
        expected = module.model(**batch).logits
    for path in (best.best_model_path, best.last_model_path):
        checkpoint = torch.load(path, weights_only=False)
        assert not any("lora_" in k for k in checkpoint["state_dict"])
        loaded = FullLM.load_from_checkpoint(path)
        assert params(loaded) == params(module)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    # A new module and Trainer test the best checkpoint, with a new callback too.
    tester = make_trainer(tmp_path / "test", [pruning(rounds=2)])
    assert tester.test(FullLM(), data, ckpt_path=best.best_model_path, verbose=False)[0]["test/loss"] > 0


@pytest.mark.parametrize("limit", [dict(fast_dev_run=True), dict(limit_train_batches=2, limit_val_batches=1),
                                   dict(limit_train_batches=1)])
def test_fast_dev_run_and_limits_shrink_the_run_and_skip_export(tmp_path, limit):
    rku = pruning(rounds=2, recovery_steps=5, calibration_batches=4, export_dir=str(tmp_path / "model"))
    trainer = make_trainer(tmp_path, [rku], **limit)
    module = TinyLM()
    trainer.fit(module, TokenData())
    assert trainer.global_step == 2 and rku.phase == "done"
    assert rku.pruner.stats.num_samples() == 2  # one calibration batch of 2 samples in the last round
    assert not (tmp_path / "model").exists() and not (tmp_path / "rku").exists()
    assert_plain(module.model)
    assert params(module) == rku.records[-1]["params"]


class StopAfterRound(L.Callback):
    """What EarlyStopping does: set trainer.should_stop when a validation ends."""

    def on_validation_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_should_stop_exports_what_was_reached_marked_short_of_the_target(tmp_path):
    rku = pruning(rounds=3, export_dir=str(tmp_path / "model"))
    trainer = make_trainer(tmp_path, [rku, StopAfterRound()])
    module = TinyLM()
    with pytest.warns(UserWarning, match="short of target_sparsity=0.4"):
        trainer.fit(module, TokenData())
    assert rku.phase == "stopped" and [r["round"] for r in rku.records] == [1]
    assert_plain(module.model)
    plan = json.loads((tmp_path / "model" / "pruning.json").read_text())
    assert plan["reached_target"] is False and plan["rounds_completed"] == 1 and plan["rounds_planned"] == 3
    loaded, _ = load_pruned(tmp_path / "model")
    assert sum(p.numel() for p in loaded.parameters()) == params(module) == rku.records[-1]["params"]


def round_one_checkpoint(tmp_path, **kwargs) -> ModelCheckpoint:
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}", **kwargs)
    make_trainer(tmp_path, [pruning(rounds=3, compact_at_end=False), saver], enable_checkpointing=True).fit(TinyLM(), TokenData())
    return saver


@pytest.mark.parametrize("change, field", [(dict(rounds=4), "rounds"), (dict(target_sparsity=0.3), "target_sparsity"),
                                           (dict(importance="magnitude"), "importance"), (dict(schedule="linear"), "schedule")])
def test_resume_with_other_settings_is_refused_naming_the_field(tmp_path, change, field):
    round_one_checkpoint(tmp_path)
    resumed = make_trainer(tmp_path / "again", [pruning(**{"rounds": 3, "compact_at_end": False, **change})])
    with pytest.raises(ValueError, match=f"other settings: {field}="):
        resumed.fit(TinyLM(), TokenData(), ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")


@pytest.mark.parametrize("every, step, phase", [(1, 1, "recover"), (2, 2, "evaluate")])
def test_resume_mid_round_warns(tmp_path, every, step, phase):
    """Mid-recovery, or at a round's last step before its validation: accepted, with what it costs."""
    round_one_checkpoint(tmp_path, every_n_train_steps=every)
    resumed = make_trainer(tmp_path / "again", [pruning(rounds=3, compact_at_end=False)])
    with pytest.warns(UserWarning, match=f"phase {phase}, not at a round end"):
        resumed.fit(TinyLM(), TokenData(), ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")


class NetLM(NoModel):
    """Keeps its Hugging Face model as `net`."""

    def _loss(self, batch):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss

    def on_train_start(self):
        self.net.train()


def test_defaults_under_log_dir_model_attr_and_state_key(tmp_path):
    rku = pruning(rounds=1, model_attr="net")
    make_trainer(tmp_path, [rku]).fit(NetLM(), TokenData())
    assert (tmp_path / "rku" / "model" / "pruning.json").is_file() and (tmp_path / "rku" / "report.json").is_file()
    assert rku.state_key != pruning().state_key and "net" in rku.state_key
    with pytest.raises(ValueError, match="model_attr"):
        RKUPruning(model_attr="not a name")


@pytest.mark.parametrize("bar", [False, True])
def test_calibration_progress_follows_the_trainer(tmp_path, bar):
    rku = pruning(rounds=1, compact_at_end=False)
    make_trainer(tmp_path, [rku], enable_progress_bar=bar).fit(TinyLM(), TokenData())
    assert rku.pruner.progress is bar


def test_replaced_max_epochs_is_said(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [pruning(rounds=1, compact_at_end=False)], max_epochs=3).fit(TinyLM(), TokenData())
    assert "max_epochs=3" in caplog.text and "are replaced" in caplog.text


def test_help_names_every_built_in_importance():
    """`importance` stays `str` (register_importance adds names), so --help must list the built-in ones."""
    from rku_lightning.pruning.importance import IMPORTANCES

    listed = re.search(r"built in: ([^;]+);", " ".join(RKUPruning.__doc__.split())).group(1)
    assert set(listed.split(", ")) == set(IMPORTANCES)


class StopAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.global_step == self.step


@pytest.mark.parametrize("step, phase, rounds", [(3, "stopped", [1, 2]), (5, "done", [1, 2, 3])])
def test_should_stop_mid_recovery_closes_the_round(tmp_path, step, phase, rounds):
    """Stopped in round 2's (or the last round's) recovery: that round is merged, recorded and compacted."""
    rku = pruning(rounds=3, export_dir=str(tmp_path / "model"))
    module = TinyLM()
    make_trainer(tmp_path, [rku, StopAtStep(step)]).fit(module, TokenData())
    assert rku.phase == phase and [r["round"] for r in rku.records] == rounds
    assert_plain(module.model)
    assert params(module) == rku.records[-1]["params"]
    plan = json.loads((tmp_path / "model" / "pruning.json").read_text())
    assert plan["reached_target"] is (phase == "done") and plan["rounds_completed"] == rounds[-1]


class TwoSetsLM(FullLM):
    """A user's module validating two sets (stand-ins for GSM8K and SVAMP), each metric named by its set."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        name = ("val/gsm8k_loss", "val/svamp_loss")[dataloader_idx]
        self.log(name, self._loss(batch), batch_size=batch["input_ids"].shape[0], add_dataloader_idx=False)


class TwoSetsData(EvalData):
    def val_dataloader(self):
        return [DataLoader(tiny_batches(2, batch_size=2, seed=2), batch_size=None),
                DataLoader(tiny_batches(1, batch_size=2, seed=6), batch_size=None)]


def test_the_verbose_validate_table_lists_each_metric_once(tmp_path):
    """`validate(verbose=True)` prints one column per dataloader, from the dicts it returns: a set's metric
    belongs in its set's dict only, and the callback's run-level `prune/*` in one dict, not in every one."""
    rku = pruning(rounds=2)
    trainer = make_trainer(tmp_path, [rku])
    module, data = TwoSetsLM(), TwoSetsData()
    run = {"prune/sparsity", "prune/round"}
    dense = trainer.validate(module, data, verbose=True)
    assert [set(result) for result in dense] == [{"val/gsm8k_loss"} | run, {"val/svamp_loss"}]
    assert dense[0]["prune/round"] == 0 and dense[0]["prune/sparsity"] == 0
    trainer.fit(module, data)
    assert all(set(record["metrics"]) == {"val/gsm8k_loss", "val/svamp_loss"} for record in rku.records)
    assert trainer.callback_metrics["prune/round"] == 2
    after = trainer.validate(module, data, verbose=True)
    assert [set(result) for result in after] == [{"val/gsm8k_loss"} | run, {"val/svamp_loss"}]
    assert after[0]["prune/sparsity"] == pytest.approx(rku.records[-1]["sparsity"])
    assert after[1]["val/svamp_loss"] == pytest.approx(rku.records[-1]["metrics"]["val/svamp_loss"], rel=1e-5)


class TrainOnly(L.LightningDataModule):
    """A user's DataModule without a validation loader: every round ends at its last step, unvalidated."""

    def __init__(self):
        super().__init__()
        self.tokens = TokenData()

    def setup(self, stage):
        self.tokens.trainer = self.trainer  # its train stream resumes from the trainer's step

    def train_dataloader(self):
        return self.tokens.train_dataloader()

    def calibration_dataloader(self):
        return self.tokens.calibration_dataloader()

    test_dataloader = held_out_loader  # Lightning's test-data hook


@pytest.mark.parametrize("saver", [dict(save_on_train_epoch_end=True, save_last=True), dict(every_n_epochs=1)],
                         ids=["save_on_train_epoch_end", "monitor_less"])
def test_a_checkpoint_at_train_epoch_end_without_validation_holds_the_pruned_model(tmp_path, saver):
    rku = pruning(rounds=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", **saver)
    trainer = make_trainer(tmp_path, [rku, checkpoint], enable_checkpointing=True)
    module, data = FullLM(), TrainOnly()
    trainer.fit(module, data)
    assert rku.phase == "done" and [r["metrics"] for r in rku.records] == [{}, {}]
    paths = {checkpoint.best_model_path, checkpoint.last_model_path} - {""}
    assert paths, "no checkpoint was written"
    batch = tiny_batches(1, seed=5)[0]
    with torch.no_grad():
        expected = module.model(**batch).logits
    tested = trainer.test(module, data, verbose=False)[0]["test/loss"]
    for path in paths:
        assert torch.load(path, weights_only=False)["callbacks"][rku.state_key]["phase"] == "done"
        loaded = FullLM.load_from_checkpoint(path)
        assert params(loaded) == params(module) == rku.records[-1]["params"]
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        tester = make_trainer(tmp_path / "test", [pruning(rounds=2)])
        assert tester.test(FullLM(), data, ckpt_path=path, verbose=False)[0]["test/loss"] == pytest.approx(tested, rel=1e-5)


def test_a_new_callback_on_a_pruned_model_attaches_nothing(tmp_path):
    """validate with a new RKUPruning measures a compacted model as it is (no all-ones gates, no hooks, no
    prune/* metrics), also one that a ckpt_path makes compacted after setup; fit with it prunes further."""
    module, data = FullLM(), EvalData()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    # Global allocation: pruning further to 0.5 lands on it (uniform cannot, on this model: docs/method.md).
    make_trainer(tmp_path, [pruning(rounds=2, allocation="global"), saver], enable_checkpointing=True).fit(module, data)
    batch = tiny_batches(1, seed=5)[0]
    with torch.no_grad():
        expected = module.model(**batch).logits
    loss = make_trainer(tmp_path / "plain", []).validate(module, data, verbose=False)[0]["val/loss"]
    rku = pruning(rounds=1, target_sparsity=0.5, allocation="global")
    assert make_trainer(tmp_path / "again", [rku]).validate(module, data, verbose=False) == [{"val/loss": pytest.approx(loss)}]
    assert rku.pruner is None and rku.records == []
    assert_plain(module.model)
    with torch.no_grad():
        torch.testing.assert_close(module.model(**batch).logits, expected)
    fresh = FullLM()
    checked = make_trainer(tmp_path / "from-ckpt", [pruning(rounds=1, target_sparsity=0.5)])
    assert checked.validate(fresh, data, ckpt_path=saver.last_model_path, verbose=False)[0]["val/loss"] == pytest.approx(loss)
    assert_plain(fresh.model)
    make_trainer(tmp_path / "further", [rku]).fit(module, data)
    assert rku.records[-1]["sparsity"] == pytest.approx(0.5, abs=0.02) and params(module) == rku.records[-1]["params"]
