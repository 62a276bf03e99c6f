"""DDP on 2 CPU processes (gloo): every rank holds the same masks, equal to a single-process run over the same data.

Each process is started the way torchrun starts it (environment variables), and runs Lightning's
`ddp` strategy. Rank r calibrates on batches r, r + 2, ... and trains on its half of each global
batch; the single-process run calibrates on all of them and trains on the whole global batch.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_callback import TinyLM, TokenData, make_trainer, pruning

pytestmark = pytest.mark.slow

SETTINGS = dict(target_sparsity=0.4, rounds=2, recovery_steps=2, calibration_batches=4, compact_at_end=False)
BATCH = 2  # per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _masks(rku) -> list[torch.Tensor]:
    return [m.clone() for m in rku.pruner.gates.mlp + rku.pruner.gates.heads]


def _worker(rank: int, out: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0"
    )
    torch.set_num_threads(1)
    rku = pruning(**SETTINGS)
    trainer = make_trainer(Path(out), [rku], strategy="ddp", devices=2)
    trainer.fit(TinyLM(), TokenData(batch_size=BATCH))
    torch.save({"masks": _masks(rku), "records": rku.records, "history": [r.to_dict() for r in rku.pruner.history]},
               Path(out) / f"rank{rank}.pt")


def test_ranks_agree_and_match_a_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for a, b in zip(ranks[0]["masks"], ranks[1]["masks"]):
        assert torch.equal(a, b)
    assert [r["round"] for r in ranks[0]["records"]] == [1, 2]
    # Validation metrics are synced: both ranks logged the same value.
    assert ranks[0]["records"][-1]["metrics"] == ranks[1]["records"][-1]["metrics"]

    single = pruning(**SETTINGS)
    make_trainer(tmp_path / "single", [single]).fit(TinyLM(), TokenData(batch_size=2 * BATCH))
    for a, b in zip(_masks(single), ranks[0]["masks"]):
        assert torch.equal(a, b)
