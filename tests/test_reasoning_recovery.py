"""Prune and recover on the dense model's own traces with distillation: exact resume and DDP with a teacher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callback import make_trainer, pruning
from test_ddp import _free_port
from test_train_cli import write_config

from rku_lightning.training.datamodule import ReasoningDataModule
from rku_lightning.training.lightning_module import CausalLMPruningModule

pytestmark = pytest.mark.slow

SETTINGS = dict(target_sparsity=0.3, rounds=2, recovery_steps=2, calibration_batches=2, compact_at_end=False,
                lora=dict(r=2, alpha=4, dropout=0.1))


def _parts(root: Path, traces: Path, **data):
    module = CausalLMPruningModule(pretrained=str(root / "tiny"), recovery="kd", kd_alpha=0.25, max_new_tokens=3, lr=1e-3)
    datamodule = ReasoningDataModule(
        train_data=str(root / "data" / "gsm8k"), val_data=str(root / "data" / "gsm8k"), ood_task=None, val_limit=2,
        batch_size=2, eval_batch_size=2, max_length=320, calibration_samples=4, train_source="self",
        calibration_source="self", trace_samples=6, trace_max_new_tokens=6, trace_cache=str(traces), **data,
    )
    return module, datamodule


def _run(root: Path, out: Path, ckpt_path=None):
    module, datamodule = _parts(root, root / "traces")
    rku = pruning(**SETTINGS)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, filename="{step}")
    trainer = make_trainer(out, [rku, checkpoints], enable_checkpointing=True)
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return rku, module, datamodule


def test_kd_on_self_traces_resumes_exactly_and_keeps_no_teacher(tmp_path):
    write_config(tmp_path)
    full, full_module, full_data = _run(tmp_path, tmp_path / "full")
    assert [(r["for"], r["hit"]) for r in full_data.trace_records] == [
        ("calibration_source", False), ("train_source", False), ("reference_traces", False)]
    calibration = {k: full_data.trace_records[0][k] for k in ("traces", "correct", "stopped")}
    assert [r["calibration"] for r in full.records] == [{"source": "self", "keep": "all", **calibration}] * 2
    # Recovery data are the dense model's traces, not the gold solutions.
    gold = {p.index: p.solution for p in full_data.calibration_problems}
    assert all("<<" not in text for text in gold.values())
    saved = sorted((tmp_path / "full" / "ckpt").glob("*.ckpt"))
    assert [p.name for p in saved] == ["step=2.ckpt", "step=4.ckpt"]
    checkpoint = torch.load(saved[0], weights_only=False)
    dense = sum(p.numel() for p in full_module.teacher.model.parameters())
    assert sum(v.numel() for k, v in checkpoint["state_dict"].items() if "lora_" not in k) < dense + 100
    assert not any("teacher" in k for k in checkpoint["state_dict"])

    resumed, resumed_module, resumed_data = _run(tmp_path, tmp_path / "resumed", ckpt_path=saved[0])
    assert all(r["hit"] for r in resumed_data.trace_records)  # the rebuilt run reads the same traces
    assert resumed.phase == "done" and [r["round"] for r in resumed.records] == [1, 2]
    for a, b in zip(full.pruner.gates.mlp + full.pruner.gates.heads, resumed.pruner.gates.mlp + resumed.pruner.gates.heads):
        assert torch.equal(a, b)
    for a, b in zip(full.records, resumed.records):
        for key, value in a["metrics"].items():
            assert b["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for (name, a), b in zip(full_module.state_dict().items(), resumed_module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    assert full.records[-1]["metrics"]["val/kl_to_dense"] > 0


def _worker(rank: int, root: str, out: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0"
    )
    torch.set_num_threads(1)
    module, datamodule = _parts(Path(root), Path(out) / "traces")
    rku = pruning(**{**SETTINGS, "lora": dict(r=2, alpha=4, dropout=0.0)})
    trainer = make_trainer(Path(out), [rku], strategy="ddp", devices=2)
    trainer.fit(module, datamodule)
    torch.save({"masks": [m.clone() for m in rku.pruner.gates.mlp + rku.pruner.gates.heads], "records": rku.records,
                "train": [(p.index, p.solution) for p in datamodule.train_problems]}, Path(out) / f"rank{rank}.pt")


def test_ddp_with_a_teacher_and_sharded_traces(tmp_path):
    write_config(tmp_path)
    mp.spawn(_worker, args=(str(tmp_path), str(tmp_path / "ddp"), _free_port()), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for a, b in zip(ranks[0]["masks"], ranks[1]["masks"]):
        assert torch.equal(a, b)
    assert ranks[0]["records"][-1]["metrics"] == ranks[1]["records"][-1]["metrics"]
    # Each rank wrote half the traces; both hold the gathered set, equal to one process's traces.
    assert ranks[0]["train"] == ranks[1]["train"] and len(ranks[0]["train"]) == 6
    module, datamodule = _parts(tmp_path, tmp_path / "single")
    datamodule.trainer = make_trainer(tmp_path, [])
    datamodule.trainer.strategy.connect(module)
    datamodule.setup("fit")
    assert [(p.index, p.solution) for p in datamodule.train_problems] == ranks[0]["train"]
