"""Render `benchmarks/RESULTS.md` and its plots from the saved rows, with bootstrap intervals.

Accuracy intervals are 95 % percentile bootstraps over questions; method-vs-RKU gaps use a
paired bootstrap on the same questions, so a reader can tell a real gap from noise.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import RESULTS, ROOT, load_rows  # noqa: E402

RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
BOOTSTRAP = 2000


def bootstrap_interval(flags: list[bool], seed: int = 0) -> tuple[float, float]:
    if not flags:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(flags)
    means = sorted(sum(flags[rng.randrange(n)] for _ in range(n)) / n for _ in range(BOOTSTRAP))
    return means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]


def paired_gap(a: list[bool], b: list[bool], seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over the same questions, with its 95 % paired-bootstrap interval."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_gap needs two equally long, non-empty lists of per-question results")
    rng = random.Random(seed)
    n = len(a)
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(BOOTSTRAP))
    return sum(diffs) / n, means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]


def method_name(row: dict) -> str:
    return "dense" if row["row"]["importance"] is None else row["row_id"].split("-")[1]


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _acc(flags: list[bool]) -> str:
    if not flags:
        return "—"
    low, high = bootstrap_interval(flags)
    return f"{sum(flags) / len(flags):.1%} [{low:.0%}, {high:.0%}]"


def oneshot_tables(rows: list[dict]) -> list[str]:
    out: list[str] = []
    by_model: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_model[row["row"]["model"]].append(row)
    for model, model_rows in sorted(by_model.items()):
        dense = next((r for r in model_rows if r["row"]["importance"] is None), None)
        settings = model_rows[0]["settings"]
        out += [
            f"### {model}: one-shot pruning, no recovery",
            "",
            f"GSM8K: first {settings['gsm8k_limit']} test questions, greedy, max {settings['max_new_tokens']} new tokens; "
            f"SVAMP: first {settings['svamp_limit']}; calibration: {settings['calib_samples']} GSM8K-train problems "
            f"(seed {settings['seed']}), ≤ {settings['calib_max_length']} tokens each. Brackets: 95 % bootstrap interval over questions; "
            "— : not measured (rows run with `--no-generate` measure CoT NLL only).",
            "",
            "| allocation | sparsity | method | GSM8K acc | CoT NLL | NLL reasoning | NLL other | SVAMP acc | params | KV bytes/token | gap to RKU (paired, GSM8K) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        pruned = [r for r in model_rows if r["row"]["importance"] is not None]
        if dense:
            g = dense["gsm8k"]
            kv = f"{pruned[0]['report']['kv_cache_bytes_per_token_before']:,}" if pruned else "—"
            out.append(
                f"| — | 0 % | dense | {_acc(dense['gsm8k_correct'])} | {_fmt(g.get('cot_nll'))} | {_fmt(g.get('cot_nll_reasoning'))} "
                f"| {_fmt(g.get('cot_nll_other'))} | {_acc(dense['svamp_correct'])} | {dense['params']:,} | {kv} | |"
            )
        key = lambda r: (r["row"]["allocation"], r["row"]["sparsity"], r["gsm8k"].get("cot_nll") or 1e9)  # noqa: E731
        for row in sorted(pruned, key=key):
            rku = next(
                (r for r in pruned if method_name(r) == "rku" and r["row"]["allocation"] == row["row"]["allocation"]
                 and r["row"]["sparsity"] == row["row"]["sparsity"]),
                None,
            )
            gap = ""
            if rku is not None and rku is not row and rku["gsm8k_correct"] and len(rku["gsm8k_correct"]) == len(row["gsm8k_correct"]):
                mean, low, high = paired_gap(rku["gsm8k_correct"], row["gsm8k_correct"])
                gap = f"{mean:+.1%} [{low:+.0%}, {high:+.0%}]"
            g, report = row["gsm8k"], row["report"]
            out.append(
                f"| {row['row']['allocation']} | {report['sparsity']:.1%} | {method_name(row)} | {_acc(row['gsm8k_correct'])} "
                f"| {_fmt(g.get('cot_nll'))} | {_fmt(g.get('cot_nll_reasoning'))} | {_fmt(g.get('cot_nll_other'))} "
                f"| {_acc(row['svamp_correct'])} | {row['params']:,} | {report['kv_cache_bytes_per_token_after']:,} | {gap} |"
            )
        out.append("")
    return out


def plot_sparsity_curves(rows: list[dict], path: Path) -> Path | None:
    pruned = [r for r in rows if r["row"]["importance"] is not None]
    if not pruned:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    curves: dict[tuple[str, str, str], list[tuple[float, dict]]] = defaultdict(list)
    for r in pruned:
        curves[(r["row"]["model"], r["row"]["allocation"], method_name(r))].append((r["row"]["sparsity"], r))
    for (model, allocation, method), points in sorted(curves.items()):
        points.sort(key=lambda p: p[0])
        xs = [p[0] * 100 for p in points]
        style = dict(marker="o", label=f"{method} ({model}, {allocation})", linewidth=2.5 if method.startswith("rku") else 1.2)
        accuracy = [sum(p[1]["gsm8k_correct"]) / len(p[1]["gsm8k_correct"]) if p[1]["gsm8k_correct"] else None for p in points]
        axes[0].plot(xs, accuracy, **style)
        axes[1].plot(xs, [p[1]["gsm8k"].get("cot_nll_reasoning") for p in points], **style)
        axes[2].plot(xs, [p[1]["gsm8k"].get("cot_nll_other") for p in points], **style)
    for ax, title in zip(axes, ["GSM8K accuracy", "CoT NLL, reasoning tokens", "CoT NLL, other tokens"]):
        ax.set_title(title)
        ax.set_xlabel("decoder sparsity (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_profile(rows: list[dict], path: Path, methods: tuple[str, ...] = ("rku", "magnitude")) -> Path | None:
    chosen = [
        r for r in rows
        if r["row"]["importance"] is not None and method_name(r) in methods and r["row"]["allocation"] == "global"
    ]
    if not chosen:
        return None
    top = max(r["row"]["sparsity"] for r in chosen)
    chosen = [r for r in chosen if r["row"]["sparsity"] == top]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for r in chosen:
        layers = r["report"]["layers"]
        xs = [layer["layer"] for layer in layers]
        label = f"{method_name(r)} ({r['row']['model']})"
        axes[0].plot(xs, [x["mlp_channels"] / x["mlp_channels_total"] for x in layers], marker="o", label=label)
        axes[1].plot(xs, [x["kv_groups"] / x["kv_groups_total"] for x in layers], marker="s", label=label)
    axes[0].set_title(f"MLP channels kept per layer ({top:.0%} global)")
    axes[1].set_title(f"attention groups kept per layer ({top:.0%} global)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def diagnostics_section(row: dict) -> list[str]:
    """Where each method prunes and how much their removed MLP channels overlap (no generation needed)."""
    pairs = sorted(row["removed_mlp_jaccard"].items(), key=lambda kv: -kv[1])
    lines = [
        f"## Where the methods prune ({row['row_id']}, global allocation)",
        "",
        f"![Fisher traces and kept fraction per layer](results/diagnostics_{row['row_id']}.png)",
        "",
        "Jaccard overlap of the removed MLP channels (random pairs sit at the chance level):",
        "",
        "| methods | overlap |",
        "|---|---|",
    ]
    lines += [f"| {pair.replace('|', ' vs ')} | {value:.2f} |" for pair, value in pairs]
    return lines + [""]


def oneshot_rows() -> list[dict]:
    """Full rows, plus NLL-only rows for the methods that have no full row yet."""
    full = load_rows("oneshot")
    have = {r["row_id"] for r in full}
    return full + [r for r in load_rows("oneshot_nll") if r["row_id"] not in have]


def render() -> Path:
    rows = oneshot_rows()
    lines = ["# Benchmark results", "", "Generated by `python -m benchmarks.run render` from `benchmarks/results/`; "
             "every number below is read from a row JSON there (with its command, commit, data hashes and timings).", ""]
    if rows:
        lines += ["## One-shot quality", ""] + oneshot_tables(rows)
        curve = plot_sparsity_curves(rows, RESULTS / "oneshot_sparsity.png")
        profile = plot_layer_profile(rows, RESULTS / "oneshot_layer_profile.png")
        lines += [f"![{alt}](results/{p.name})" for alt, p in (("accuracy and CoT NLL vs sparsity", curve), ("kept fraction per layer", profile)) if p]
        lines.append("")
    for row in load_rows("diagnostics"):
        lines += diagnostics_section(row)
    for stage in ("peer", "efficiency", "recover"):
        extra = load_rows(stage)
        if extra:
            lines += [f"## {stage}", "", "Rows: " + ", ".join(f"`results/{stage}/{r['row_id']}.json`" for r in extra), ""]
    RESULTS_MD.write_text("\n".join(lines) + "\n")
    return RESULTS_MD
