"""Resume: a run restarted from the checkpoint written after round 2 of 4 ends like the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callback import TinyLM, TokenData, make_trainer, pruning

pytestmark = pytest.mark.slow

# LoRA dropout on: equality needs the per-round seeding, not just identical weights.
SETTINGS = dict(target_sparsity=0.4, rounds=4, recovery_steps=2, calibration_batches=4, compact_at_end=False,
                lora=dict(r=2, alpha=4, dropout=0.1))


def masks(rku) -> list[torch.Tensor]:
    return [m.clone() for m in rku.pruner.gates.mlp + rku.pruner.gates.heads]


def run(tmp_path, ckpt_path=None):
    rku = pruning(**SETTINGS)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}")
    trainer = make_trainer(tmp_path, [rku, checkpoints], enable_checkpointing=True)
    module = TinyLM(seed=0)
    trainer.fit(module, TokenData(), ckpt_path=ckpt_path)
    return rku, module


def test_resume_after_round_two_matches_uninterrupted(tmp_path):
    full, full_module = run(tmp_path / "full")
    saved = sorted((tmp_path / "full" / "ckpt").glob("*.ckpt"))
    assert [p.name for p in saved] == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt", "step=8.ckpt"]
    state = torch.load(saved[1], weights_only=False)["callbacks"]
    rku_state = next(v for k, v in state.items() if k.startswith("RKUPruning"))
    assert rku_state["round"] == 2 and rku_state["phase"] == "calibrate" and len(rku_state["records"]) == 2

    resumed, resumed_module = run(tmp_path / "resumed", ckpt_path=saved[1])
    assert resumed.phase == "done" and [r["round"] for r in resumed.records] == [1, 2, 3, 4]
    for a, b in zip(masks(full), masks(resumed)):
        assert torch.equal(a, b)
    for a, b in zip(full.records, resumed.records):
        assert a["sparsity"] == b["sparsity"] and a["layers"] == b["layers"]
        assert a["metrics"]["val/loss"] == pytest.approx(b["metrics"]["val/loss"], rel=1e-6, abs=1e-6)
    for (name, a), b in zip(full_module.state_dict().items(), resumed_module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
