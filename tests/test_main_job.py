"""The main job (`make demo`): configs/demo.yaml with its sizes shrunk, on a tiny model and then on the embedded one.

What it must leave: the report and its plots, the export, and a summary (printed, summary.txt and
summary.json) that says what was removed, what was kept, how much faster, and where things are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_train_cli import OUTPUT_FILES, write_config

from rku_lightning.training.summary import SUMMARY_FILES, format_summary, summarize

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
#: The demo's sizes, shrunk: everything else (model family aside) is the shipped config.
SHRUNK = """
model:
  max_new_tokens: 4
data:
  val_limit: 2
  ood_limit: 2
  calibration_samples: 2
  trace_max_new_tokens: 4
pruning:
  calibration_batches: 1
  recovery_steps: 1
speed_tokens: 2
"""


def run_demo(tmp_path: Path, monkeypatch, *overrides: str):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(sys, "argv", ["train.py"])
    import train as train_script

    shrunk = tmp_path / "shrunk.yaml"
    shrunk.write_text(SHRUNK)
    return train_script.main(["--config", str(DEMO), "--config", str(shrunk), f"--output_root={tmp_path / 'outputs'}", *overrides])


def check_outputs(out: Path, printed: str) -> dict:
    for name in (*OUTPUT_FILES, *SUMMARY_FILES):
        assert (out / name).stat().st_size > 0, name
    assert (out / "model" / "pruning.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.txt").read_text().strip() == format_summary(summary) and format_summary(summary) in printed
    assert summary["rounds"] == 1 and summary["sparsity"] == pytest.approx(0.2, abs=0.03) and summary["reached_target"]
    assert summary["params"]["pruned"] < summary["params"]["dense"]
    assert summary["kv_cache_bytes_per_token"]["pruned"] <= summary["kv_cache_bytes_per_token"]["dense"]
    assert set(summary["accuracy"]) == {"gsm8k", "svamp"}
    assert all(a["questions"] == 2 and a["dense"] is not None for a in summary["accuracy"].values())
    assert all(0 <= a["cut"] <= 2 and 0 <= a["cut_dense"] <= 2 for a in summary["accuracy"].values())  # answers cut at the cap
    assert summary["kl_to_dense"]["0"] == pytest.approx(0, abs=1e-6) and summary["kl_to_dense"]["1"] > 0
    decode = summary["decode"]
    assert decode["dense_tokens_per_s"] > 0 and decode["speedup"] == pytest.approx(decode["pruned_tokens_per_s"] / decode["dense_tokens_per_s"])
    references = summary["traces"]  # the dense model's answers that KL to dense is measured on
    assert [t["for"] for t in references] == ["reference_traces"] and references[0]["traces"] == 2
    assert "reference_traces: 2 dense traces" in printed
    assert summary["export_dir"] == str(out / "model") and str(out / "model") in printed and "report.md" in printed
    return summary


@pytest.mark.slow
def test_the_main_job_shrunk_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    write_config(tmp_path)  # the tiny Qwen2 model and data
    data = tmp_path / "data"
    run_demo(tmp_path, monkeypatch, f"--model.pretrained={tmp_path / 'tiny'}", f"--data.train_data={data / 'gsm8k'}",
             f"--data.val_data={data / 'gsm8k'}", f"--data.ood_data={data / 'svamp'}", "--data.max_length=320")
    check_outputs(tmp_path / "outputs" / "demo", capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.real_model
def test_the_main_job_shrunk_on_the_embedded_model(tmp_path, monkeypatch, capsys):
    run_demo(tmp_path, monkeypatch)
    check_outputs(tmp_path / "outputs" / "demo", capsys.readouterr().out)


def test_the_summary_counts_answers_and_refuses_a_run_without_pruning():
    dense = {"round": 0, "sparsity": 0.0, "params": 100, "kv_cache_bytes_per_token": 64,
             "metrics": {"val/gsm8k_acc": 0.5, "val/gsm8k_truncated": 0.25, "val/ood_acc": 0.25, "val/kl_to_dense": 0.0}}
    pruned = {"round": 1, "sparsity": 0.2, "params": 80, "kv_cache_bytes_per_token": 48, "dense_params": 100,
              "dense_kv_cache_bytes_per_token": 64,
              "metrics": {"val/gsm8k_acc": 0.25, "val/gsm8k_truncated": 0.75, "val/ood_acc": 0.25, "val/ood_truncated": float("nan"),
                          "val/kl_to_dense": 0.1}}
    speed = {"dense": {"median": 10.0, "runs": [10.0, 9.0, 11.0]}, "pruned": {"median": 12.5, "runs": [12.5, 9.9, 15.4]},
             "settings": {"repeats": 3}}
    traces = [{"for": "train_source", "path": "t.json", "hit": True, "seconds": 0.1, "traces": 64, "correct": 15, "stopped": 23}]
    summary = summarize([pruned, dense], {"val/gsm8k_acc": ("gsm8k", 8), "val/ood_acc": ("svamp", 4)}, speed, 75.0, "out/model", "out",
                        traces=traces)
    assert summary["accuracy"] == {"gsm8k": {"questions": 8, "dense": 4, "pruned": 2, "cut": 6, "cut_dense": 2},
                                   "svamp": {"questions": 4, "dense": 1, "pruned": 1, "cut": None, "cut_dense": None}}
    assert summary["decode"]["speedup"] == pytest.approx(1.25) and summary["kl_to_dense"] == {0: 0.0, 1: 0.1}
    text = format_summary(summary)
    assert summary["decode"]["pair_speedups"] == pytest.approx([1.25, 1.1, 1.4])
    assert "gsm8k: 2/8 correct (dense 4/8); 6 cut at the token cap (dense 2)" in text and "svamp: 1/4 correct (dense 1/4)\n" in text
    assert summary["traces"] == traces and "train_source: 64 dense traces, 15 right, 23 stopped at the token cap (cached)" in text
    assert "1.25x" in text and "3 interleaved pairs 1.10-1.40x" in text and "1 min 15 s" in text and "100 -> 80" not in text
    # A run that skipped the dense evaluation still knows how big the dense model was, not how well it answered.
    unevaluated = summarize([pruned], {"val/gsm8k_acc": ("gsm8k", 8)}, None, 75.0, None, None)
    assert unevaluated["params"] == {"dense": 100, "pruned": 80}
    assert unevaluated["kv_cache_bytes_per_token"] == {"dense": 64, "pruned": 48}
    assert "KV cache 64 -> 48 bytes/token" in format_summary(unevaluated)
    assert "gsm8k: 2/8 correct (dense ?/8)" in format_summary(unevaluated)
    with pytest.raises(ValueError, match="pruned nothing"):
        summarize([dense], {}, None, 1.0, None, None)
