"""`python train.py` end to end on a tiny model and tiny local data; config errors before any compute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("report.json", "report.md", "sparsity_curve.png", "layer_profile.png")


def write_problems(folder: Path) -> None:
    """Short GSM8K-style and SVAMP-style problems: the char-level tokenizer keeps sequences short."""
    gsm, svamp = folder / "gsm8k", folder / "svamp"
    gsm.mkdir(parents=True)
    svamp.mkdir()
    rows = [{"question": f"Tom has {a} apples and gets {b} more. How many?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
            for a, b in zip(range(1, 25), range(3, 27))]
    (gsm / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:20]) + "\n")
    (gsm / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[20:]) + "\n")
    (svamp / "test.jsonl").write_text("\n".join(json.dumps({"input": f"{a} plus {a}?", "target": 2 * a}) for a in range(4)) + "\n")


def write_config(tmp_path: Path) -> Path:
    model_dir = tmp_path / "tiny"
    tiny_model("qwen2", max_position_embeddings=512).save_pretrained(model_dir)
    tiny_tokenizer(tmp_path).save_pretrained(model_dir)
    write_problems(tmp_path / "data")
    data = tmp_path / "data"
    config = f"""
seed_everything: 0
run_name: tiny
output_root: {tmp_path / "outputs"}
model:
  pretrained: {model_dir}
  lr: 1.0e-3
  max_new_tokens: 4
data:
  train_data: {data / "gsm8k"}
  val_data: {data / "gsm8k"}
  ood_data: {data / "svamp"}
  ood_task: svamp
  val_limit: 4
  ood_limit: 4
  calibration_samples: 8
  batch_size: 2
  eval_batch_size: 4
  max_length: 320
pruning:
  target_sparsity: 0.3
  rounds: 2
  allocation: global  # removes KV groups too: a tiny random model's KL to dense is then well above noise
  calibration_batches: 2
  recovery_steps: 2
  lora: {{r: 2, alpha: 4, dropout: 0.0}}
trainer:
  accelerator: cpu
  devices: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_model_summary: false
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(config)
    return path


def train(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.slow
@pytest.mark.parametrize(
    "accelerator, importance",
    [("cpu", "rku"), pytest.param("gpu", "rku", marks=GPU), pytest.param("gpu", "flap", marks=GPU)],
)
def test_train_py_end_to_end(tmp_path, accelerator, importance):
    """The whole run; on a GPU too, where every tensor the engine makes must follow the model's device."""
    result = train("--config", str(write_config(tmp_path)), f"--trainer.accelerator={accelerator}", f"--pruning.importance={importance}")
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "outputs" / "tiny"
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    for name in ("sparsity_curve.png", "layer_profile.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and report["run"]["target_sparsity"] == 0.3
    assert rounds[0]["sparsity"] == 0 and rounds[-1]["sparsity"] == pytest.approx(0.3, abs=0.03)
    for r in rounds:
        assert set(r["metrics"]) == {"val/gsm8k_acc", "val/cot_nll", "val/cot_nll_reasoning", "val/cot_nll_other", "val/ood_acc",
                                     "val/kl_to_dense", "val/kl_to_dense_gold", *GSM8K_ANSWERS, *OOD_ANSWERS}
        assert all(0 <= r["metrics"][f"val/{task}_truncated"] <= 1 for task in ("gsm8k", "ood"))
        assert r["params"] > 0 and r["kv_cache_bytes_per_token"] > 0
    # Fidelity to the dense model: none before pruning, some after.
    assert rounds[0]["metrics"]["val/kl_to_dense"] == pytest.approx(0, abs=1e-6)
    assert rounds[0]["metrics"]["val/kl_to_dense_gold"] == pytest.approx(0, abs=1e-6)
    assert all(r["metrics"]["val/kl_to_dense"] > 1e-4 and r["metrics"]["val/kl_to_dense_gold"] > 1e-4 for r in rounds[1:])
    assert rounds[2]["params"] < rounds[1]["params"] < rounds[0]["params"]
    assert rounds[0]["time_evaluate_s"] > 0
    assert "calibration" not in rounds[0] and all(r["calibration"] == {"source": "gold"} for r in rounds[1:])
    # Every validation answer of every round is kept, and the logged accuracies are their means.
    for r in rounds:
        answers = [json.loads(line) for line in (out / "generations" / f"round-{r['round']}.jsonl").read_text().splitlines()]
        for task, metric in (("gsm8k", "val/gsm8k_acc"), ("ood", "val/ood_acc")):
            mine = [a for a in answers if a["task"] == task]
            assert len(mine) == 4 and len({a["index"] for a in mine}) == 4
            assert sum(a["correct"] for a in mine) / 4 == pytest.approx(r["metrics"][metric])
            assert all(a["tokens"] <= 4 and isinstance(a["text"], str) for a in mine)
    assert all(r["time_recover_s"] > 0 and r["time_evaluate_s"] > 0 for r in rounds[1:])
    table = (out / "report.md").read_text()
    assert table.count("\n| ") == 4 and "GSM8K acc" in table and "OOD acc" in table  # header + 3 rounds
    metrics_csv = next((out / "csv").glob("version_*/metrics.csv")).read_text()
    assert "val/gsm8k_acc" in metrics_csv and "prune/sparsity" in metrics_csv and "prune/round" in metrics_csv
    assert not {"sparsity", "round"} & set(metrics_csv.splitlines()[0].split(","))
    assert list((out / "tensorboard").glob("version_*/events.out.tfevents.*"))
    # The checkpoint is the last round's end: the compacted model, its plan and the callback's state.
    checkpoint = torch.load(out / "checkpoints" / "round-end.ckpt", weights_only=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["round-end.ckpt"]
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("RKUPruning"))
    assert state["round"] == 2 and state["phase"] == "done" and len(state["records"]) == 3
    # The frozen teacher (kl_to_dense) never enters a checkpoint: one (pruned) model's worth of weights, no more.
    assert sum(v.numel() for v in checkpoint["state_dict"].values()) == rounds[-1]["params"]
    assert checkpoint["rku_pruning_plans"]["model"]["layers"] == json.loads((out / "model" / "pruning.json").read_text())["layers"]
    model_dir = out / "model"
    assert (model_dir / "pruning.json").is_file() and (model_dir / "model.safetensors").is_file()
    from rku_lightning import load_pruned

    model, tokenizer = load_pruned(model_dir)
    assert sum(p.numel() for p in model.parameters()) == rounds[-1]["params"] and tokenizer is not None


@pytest.mark.parametrize(
    "override, field",
    [
        ("--pruning.rounds=0", "rounds"),
        ("--pruning.importance=entropy", "importance"),
        ("--pruning.target_sparsity=0.97", "target_sparsity"),
        ("--data.train_data=/nonexistent/gsm8k/train.jsonl", "train_data"),
    ],
)
def test_bad_configuration_fails_before_compute(tmp_path, capsys, monkeypatch, override, field):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when pytest's own flags are there too
    import train as train_script

    with pytest.raises((ValueError, SystemExit)) as caught:
        train_script.main(["--config", str(write_config(tmp_path)), override])
    assert field in str(caught.value) + capsys.readouterr().err
    assert not (tmp_path / "outputs" / "tiny" / "checkpoints").exists()
    assert not (tmp_path / "outputs" / "tiny" / "report.json").exists()


def _validation_setup(tmp_path, generate: bool = True, datamodule_class=None):
    from rku_lightning.training.datamodule import ReasoningDataModule
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    write_config(tmp_path)  # writes the tiny model and data
    data = tmp_path / "data"
    module = CausalLMPruningModule(pretrained=str(tmp_path / "tiny"), max_new_tokens=2, generate=generate)
    datamodule = (datamodule_class or ReasoningDataModule)(
        train_data=str(data / "gsm8k"), val_data=str(data / "gsm8k"), ood_data=str(data / "svamp"),
        val_limit=4, ood_limit=4, eval_batch_size=2, max_length=320,
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return module, datamodule, trainer


NLL_METRICS = {"val/cot_nll", "val/cot_nll_reasoning", "val/cot_nll_other", "val/kl_to_dense", "val/kl_to_dense_gold"}
# `*_steps_right` is logged only for answers that write arithmetic steps, which a tiny random model's do not.
GSM8K_ANSWERS, OOD_ANSWERS = ({f"val/{task}_{name}" for name in ("acc", "truncated")} for task in ("gsm8k", "ood"))


def test_arithmetic_steps_are_logged_when_answers_write_them(tmp_path):
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    write_config(tmp_path)
    module = CausalLMPruningModule(pretrained=str(tmp_path / "tiny"), kl_to_dense=False, max_new_tokens=4)
    module.gsm8k_accuracy.update(["3 + 4 = 7, 7 * 2 = 15 #### 15"], [14], num_tokens=[4])
    values = module._set_values(True)
    assert values["val/gsm8k_steps_right"].item() == pytest.approx(0.5) and values["val/gsm8k_truncated"].item() == 1.0
    module.ood_accuracy.update(["#### 3"], [3], num_tokens=[2])
    assert set(module._set_values(False)) == {"val/ood_acc", "val/ood_truncated"}


def test_kl_on_arithmetic_tokens_is_the_evaluation_split(tmp_path):
    """`val/kl_to_dense_reasoning` is `kl_per_problem`'s arithmetic-token KL: runs and benchmarks measure one thing."""
    from rku_lightning.evaluation.data import load_problems
    from rku_lightning.evaluation.evaluate import kl_per_problem
    from rku_lightning.training.datamodule import _collate_solutions, _SolutionSet
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    write_config(tmp_path)
    module = CausalLMPruningModule(pretrained=str(tmp_path / "tiny"), max_new_tokens=2, generate=False)
    torch.manual_seed(0)
    with torch.no_grad():  # drift from the frozen dense copy
        for weight in module.model.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    problems = load_problems(str(tmp_path / "data" / "gsm8k"), "gsm8k", split="test", limit=3)
    # Gold text as the reference answers: unlike a tiny random model's own answers, it has arithmetic tokens.
    items = _SolutionSet(module.tokenizer, problems, 320, {p.index: p for p in problems})
    module.validation_step(_collate_solutions(module.tokenizer.pad_token_id)([items[i] for i in range(3)]), 0)
    values = module._set_values(True)
    rows = kl_per_problem(module.model, module.teacher.model, module.tokenizer, problems, batch_size=1, max_length=320, progress=False)
    overall = sum(r["kl_sum"] for r in rows) / sum(r["tokens"] for r in rows)
    arithmetic = sum(r["kl_sum_reasoning"] for r in rows) / sum(r["tokens_reasoning"] for r in rows)
    assert values["val/kl_to_dense"].item() == pytest.approx(overall, rel=1e-4)
    assert values["val/kl_to_dense_reasoning"].item() == pytest.approx(arithmetic, rel=1e-4)
    assert abs(arithmetic - overall) > 1e-3 * overall  # a different mean, not the overall one again


@pytest.mark.parametrize("generate", [True, False])
def test_validation_without_generation_measures_nll_only(tmp_path, generate):
    """`model.generate: false` is the cheap per-round check: CoT NLL, no answers and so no accuracy.

    Each set's metrics are in its own dataloader's results only, which `validate(verbose=True)` prints as
    its columns: the SVAMP column does not repeat GSM8K's accuracy and NLLs.
    """
    module, datamodule, trainer = _validation_setup(tmp_path, generate)
    results = trainer.validate(module, datamodule, verbose=True)
    assert [set(result) for result in results] == ([NLL_METRICS | GSM8K_ANSWERS, OOD_ANSWERS] if generate
                                                   else [NLL_METRICS, set()])


class _Batches(torch.utils.data.IterableDataset):
    """Ready batches behind a loader without a length."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_validation_loaders_without_a_length_still_log_every_metric(tmp_path):
    """A set whose loader has no length is logged at epoch end, which Lightning lists under every dataloader."""
    from torch.utils.data import DataLoader

    from rku_lightning.training.datamodule import ReasoningDataModule

    class Unsized(ReasoningDataModule):
        def val_dataloader(self):
            return [DataLoader(_Batches(list(loader)), batch_size=None) for loader in super().val_dataloader()]

    module, datamodule, trainer = _validation_setup(tmp_path)
    sized = {k: v for result in trainer.validate(module, datamodule, verbose=False) for k, v in result.items()}
    _, unsized_data, trainer = _validation_setup(tmp_path / "unsized", datamodule_class=Unsized)
    unsized = trainer.validate(module, unsized_data, verbose=False)
    assert set(sized) == NLL_METRICS | GSM8K_ANSWERS | OOD_ANSWERS
    assert len(unsized) == 2 and all(result == pytest.approx(sized, rel=1e-5) for result in unsized)


def test_validation_scores_nll_in_slices_with_the_same_result(tmp_path):
    """`nll_batch_size` bounds the logits held at once (GBs for a real vocabulary) without changing the NLL."""
    import lightning as L

    from rku_lightning.training.datamodule import ReasoningDataModule
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    write_config(tmp_path)
    data = tmp_path / "data"
    results = {}
    for size in (None, 1, 3):
        module = CausalLMPruningModule(pretrained=str(tmp_path / "tiny"), generate=False, nll_batch_size=size)
        datamodule = ReasoningDataModule(train_data=str(data / "gsm8k"), val_data=str(data / "gsm8k"), val_limit=4,
                                         eval_batch_size=4, max_length=320)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        results[size] = trainer.validate(module, datamodule, verbose=False)[0]
    assert results[None]["val/cot_nll"] > 0
    for size in (1, 3):
        for key, value in results[None].items():
            assert results[size][key] == pytest.approx(value, rel=1e-5), (size, key)
    with pytest.raises(ValueError, match="nll_batch_size"):
        CausalLMPruningModule(pretrained=str(tmp_path / "tiny"), nll_batch_size=0)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config):
    """Every config in configs/ is valid for train.py (checked by LightningCLI without loading a model)."""
    result = train("--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "target_sparsity:" in result.stdout and "pretrained:" in result.stdout


@pytest.mark.parametrize(
    "preset, rounds, val_limit",
    [("cpu", 2, 32), ("cpu-uniform", 2, 32), ("cpu-recovery-only", 1, 32), ("cpu-uniform-kd-self", 2, 32),
     ("cpu-uniform-kd-self-L640", 2, 32), ("cpu-uniform-L640", 2, 32), ("gpu-ce-gold", 4, 100), ("gpu-kd-self", 4, 100), ("gpu-recovery-only", 1, 100),
     ("cpu-uniform-L640-30", 2, 32), ("cpu-uniform-kd-self-L640-30", 2, 32), ("gpu-ce-gold-30", 4, 100), ("gpu-kd-self-30", 4, 100),
     ("cpu-uniform-L640-20", 2, 32), ("cpu-uniform-kd-self-L640-20", 2, 32)],
)
def test_recover_presets_parse(preset, rounds, val_limit):
    """The benchmark's presets are valid overrides of the config they modify."""
    from benchmarks.recover import CONFIG, PRESETS

    result = train("--config", str(ROOT / CONFIG), *PRESETS[preset], "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"rounds: {rounds}\n" in result.stdout and f"val_limit: {val_limit}" in result.stdout
    if "kd-self" in preset:
        assert "recovery: kd" in result.stdout and "train_source: self" in result.stdout
    window = [o.split("=")[1] for o in PRESETS[preset] if o.startswith("--data.max_length=")]
    assert not window or f"max_length: {window[-1]}\n" in result.stdout
    target = {"30": "0.3", "20": "0.2"}.get(preset.rsplit("-", 1)[-1], "0.001" if "recovery-only" in preset else "0.4")
    assert f"target_sparsity: {target}\n" in result.stdout


def _train_script(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when pytest's own flags are there too
    import train as train_script

    return train_script


@pytest.mark.parametrize("option", ["--optimizer=SGD", "--optimizer.lr=0.01", "--lr_scheduler=StepLR"])
def test_optimizer_options_say_where_the_optimizer_comes_from(tmp_path, monkeypatch, option):
    train_script = _train_script(monkeypatch)
    with pytest.raises(SystemExit, match="is not available: .*--model.lr"):
        train_script.main(["--config", str(write_config(tmp_path)), option])


def test_abbreviated_options_are_errors(tmp_path, monkeypatch, capsys):
    train_script = _train_script(monkeypatch)
    with pytest.raises(SystemExit):
        train_script.make_cli(["--config", str(write_config(tmp_path)), "--pruning.recovery_step=5"])
    assert "recovery_step" in capsys.readouterr().err


@pytest.mark.parametrize("bar", [True, False])
def test_the_progress_bar_follows_enable_progress_bar(tmp_path, monkeypatch, bar):
    from rku_lightning.callbacks import RKUProgressBar

    train_script = _train_script(monkeypatch)
    cli = train_script.make_cli(["--config", str(write_config(tmp_path)), f"--trainer.enable_progress_bar={str(bar).lower()}"])
    assert isinstance(cli.trainer.progress_bar_callback, RKUProgressBar) is bar


class SigtermInRoundTwo(L.Callback):
    """Sends this process SIGTERM in round 2 (what a cluster's time limit does)."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_exits_non_zero_naming_the_checkpoint_to_resume_from(tmp_path, monkeypatch, capsys):
    train_script = _train_script(monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        train_script.main(["--config", str(write_config(tmp_path)), "--evaluate_dense=false", "--model.generate=false",
                           '--trainer.callbacks=[{"class_path": "test_train_cli.SigtermInRoundTwo"}]'])
    assert stopped.value.code == train_script.SIGTERM_EXIT
    checkpoint = tmp_path / "outputs" / "tiny" / "checkpoints" / "round-end.ckpt"
    assert f"resume with --ckpt_path {checkpoint}" in capsys.readouterr().err and checkpoint.is_file()
    assert not (tmp_path / "outputs" / "tiny" / "model").exists()


def test_the_standard_module_loads_a_pruned_checkpoint(tmp_path):
    """`CausalLMPruningModule.load_from_checkpoint` rebuilds the pruned shapes the final checkpoint holds."""
    from rku_lightning import StructuredPruner, compact
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    write_config(tmp_path)
    module = CausalLMPruningModule(pretrained=str(tmp_path / "tiny"), generate=False)
    StructuredPruner(module.model, importance="magnitude", progress=False).prune(0.3)
    plan = compact(module.model)
    path = tmp_path / "pruned.ckpt"
    torch.save({"state_dict": module.state_dict(), "rku_pruning_plans": {"model": plan}, "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    loaded = CausalLMPruningModule.load_from_checkpoint(path)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, torch.ones_like(ids)), module(ids, torch.ones_like(ids)))


def test_the_dense_table_shows_each_set_its_own_metrics(monkeypatch):
    """One line per dataloader's results (test_validation_without_generation_measures_nll_only: one set's each)."""
    train_script = _train_script(monkeypatch)
    results = [{"val/gsm8k_acc": 0.5, "val/cot_nll": 1.25, "val/kl_to_dense": 0.0, "prune/round": 0.0}, {"val/ood_acc": 0.25}]
    gsm8k, svamp = train_script.dense_table(results, "svamp").splitlines()[1:]
    assert gsm8k == "  gsm8k: val/cot_nll=1.2500, val/gsm8k_acc=0.5000, val/kl_to_dense=0.0000"
    assert svamp == "  svamp: val/ood_acc=0.2500"
    assert train_script.dense_table(results[:1], "svamp").splitlines()[1:] == [gsm8k]
