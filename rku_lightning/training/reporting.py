"""Run reports of iterative pruning: report.json, report.md and two plots (matplotlib, Agg backend).

A record is one round (round 0: the dense model when it was evaluated) as `RKUPruning` builds it:
sparsity, parameter count, KV-cache bytes per token, per-layer kept structures, wall time of each
phase, the validation metrics and, when the calibration data said, what it was built from
(`calibration`: how many of its traces were right, how many the token budget stopped). Files are
written through a temporary name and renamed, so a report being read while a run goes on is never
half-written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rku_lightning.files import write_file_atomic, write_text_atomic  # noqa: E402

#: Display names of the metrics `CausalLMPruningModule` logs, in table order; other `val/...` metrics follow.
METRIC_LABELS: dict[str, str] = {
    "val/gsm8k_acc": "GSM8K acc",
    "val/cot_nll": "CoT NLL",
    "val/cot_nll_reasoning": "CoT NLL reasoning",
    "val/cot_nll_other": "CoT NLL other",
    "val/ood_acc": "OOD acc",
    "val/gsm8k_truncated": "GSM8K cut at cap",
    "val/ood_truncated": "OOD cut at cap",
    "val/gsm8k_steps_right": "GSM8K steps right",
    "val/ood_steps_right": "OOD steps right",
    "val/kl_to_dense": "KL to dense",
    "val/kl_to_dense_reasoning": "KL to dense reasoning",
    "val/kl_to_dense_gold": "KL to dense (gold)",
}
ACCURACY_METRICS = ("val/gsm8k_acc", "val/ood_acc")
NLL_METRICS = ("val/cot_nll", "val/cot_nll_reasoning", "val/cot_nll_other")
KL_METRICS = ("val/kl_to_dense", "val/kl_to_dense_reasoning", "val/kl_to_dense_gold")
PHASE_TIMES = (
    ("time_calibrate_prune_s", "calibrate+prune s"),
    ("time_recover_s", "recover s"),
    ("time_per_step_s", "s/step"),
    ("time_evaluate_s", "evaluate s"),
)
FILES = ("report.json", "report.md", "sparsity_curve.png", "layer_profile.png")


def metric_names(records: Sequence[dict]) -> list[str]:
    """Metrics present in any record: the known ones in their order, then the rest sorted."""
    present = {name for record in records for name in record.get("metrics", {})}
    return [m for m in METRIC_LABELS if m in present] + sorted(present - set(METRIC_LABELS))


def _cell(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _traces_cell(calibration: dict | None) -> str:
    if not calibration or "traces" not in calibration:
        return "–"
    return f"{calibration['correct']}/{calibration['traces']} right, {calibration['stopped']} cut"


def markdown_table(records: Sequence[dict]) -> str:
    """One row per round: sparsity, size, KV cache, metrics, phase times (and calibration traces, if any)."""
    metrics = metric_names(records)
    traced = any("traces" in r.get("calibration", {}) for r in records)
    header = ["round", "target", "sparsity", "params", "KV bytes/token"]
    header += [METRIC_LABELS.get(m, m) for m in metrics] + [label for _, label in PHASE_TIMES] + ["recover peak GiB"]
    header += ["calibration traces"] if traced else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        row = [str(r["round"]), f"{r['target_sparsity']:.3f}", f"{r['sparsity']:.3f}", f"{r['params']:,}"]
        row.append(f"{r['kv_cache_bytes_per_token']:,}")
        row += [_cell(r.get("metrics", {}).get(m)) for m in metrics]
        row += [_cell(r.get(key), 2 if key == "time_per_step_s" else 1) for key, _ in PHASE_TIMES]
        peak = r.get("recover_peak_memory_bytes")
        row.append(_cell(peak / 2**30, 2) if peak else "–")
        row += [_traces_cell(r.get("calibration"))] if traced else []
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _markdown(records: Sequence[dict], run: dict) -> str:
    shown = {k: v for k, v in run.items() if k not in ("phase", "export_dir")}
    if isinstance(shown.get("lora"), dict):
        shown["lora"] = "r={r} alpha={alpha} dropout={dropout}".format(**shown["lora"])
    settings = ", ".join(f"{k}={v}" for k, v in shown.items())
    return (
        "# Iterative RKU pruning report\n\n"
        f"Settings: {settings}\n\n"
        "Sparsity is the removed fraction of decoder-layer parameters; params counts the whole model. "
        "Round 0 is the dense model.\n\n" + markdown_table(records) + "\n"
    )


def _plot_curve(records: Sequence[dict], path: Path) -> None:
    names = metric_names(records)
    groups = [
        ("accuracy", [m for m in names if m in ACCURACY_METRICS or m.endswith("_acc")]),
        ("KL(dense || model) per token", [m for m in names if m in KL_METRICS]),
        ("NLL of gold text (nats/token)", [m for m in names if m in NLL_METRICS or "nll" in m]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (ylabel, group) in zip(axes, groups):
        for metric in group:
            points = [(r["sparsity"], r["metrics"][metric]) for r in records if metric in r.get("metrics", {})]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=METRIC_LABELS.get(metric, metric))
        ax.set_xlabel("decoder sparsity")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if group:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Reasoning metrics across pruning rounds")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _plot_layers(records: Sequence[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = (("mlp_channels", "mlp_channels_total", "MLP channels kept"), ("kv_groups", "kv_groups_total", "attention groups kept"))
    for ax, (kept, total, title) in zip(axes, panels):
        for r in records:
            if r["round"] == 0 or not r.get("layers"):
                continue
            layers = r["layers"]
            ax.plot(
                [layer["layer"] for layer in layers],
                [layer[kept] / layer[total] for layer in layers],
                marker=".",
                label=f"round {r['round']} ({r['sparsity']:.2f})",
            )
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("kept fraction")
    if any(r["round"] > 0 for r in records):
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_reports(records: Sequence[dict], out_dir: str | os.PathLike, run: dict | None = None) -> dict[str, Path]:
    """Write report.json, report.md, sparsity_curve.png and layer_profile.png into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r["round"])
    run = run or {}
    paths = {name: out / name for name in FILES}
    payload = json.dumps({"run": run, "rounds": records}, indent=2, default=str)
    write_text_atomic(paths["report.json"], payload)
    write_text_atomic(paths["report.md"], _markdown(records, run))
    write_file_atomic(paths["sparsity_curve.png"], lambda tmp: _plot_curve(records, tmp))
    write_file_atomic(paths["layer_profile.png"], lambda tmp: _plot_layers(records, tmp))
    return paths
