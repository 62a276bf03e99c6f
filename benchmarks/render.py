"""Render `benchmarks/RESULTS.md` and its plots from the saved rows, with bootstrap intervals.

Accuracy intervals are 95 % percentile bootstraps over questions; method-vs-RKU gaps use a
paired bootstrap on the same questions, so a reader can tell a real gap from noise.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from rku_lightning.training.reporting import markdown_table  # noqa: E402

from .answers import AnswerSet, answer_sets  # noqa: E402
from .common import RESULTS, ROOT, load_rows  # noqa: E402
from .oneshot import ATTENTION_SUFFIXES, Settings  # noqa: E402
from .recover import BASELINES, PICKED_ON, REFERENCES, preset_seed  # noqa: E402

RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
BOOTSTRAP = 2000
#: What the "from question PICKED_ON on" columns of the recovered-answers tables hold, and why.
UNFITTED = (f"*from question {PICKED_ON} on*: each set's questions after its first {PICKED_ON}, which the one-shot rows "
            "that chose the global MLP-only allocation did not answer.")


def _bootstrap(n: int, statistic: Callable[[list[int]], float], seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of `statistic` over question indices resampled with replacement."""
    rng = random.Random(seed)
    values = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(BOOTSTRAP))
    return values[int(0.025 * BOOTSTRAP)], values[int(0.975 * BOOTSTRAP) - 1]


def bootstrap_interval(flags: list[bool], seed: int = 0) -> tuple[float, float]:
    if not flags:
        return (float("nan"), float("nan"))
    return _bootstrap(len(flags), lambda idx: sum(flags[i] for i in idx) / len(idx), seed)


def paired_gap(a: list[bool], b: list[bool], seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over the same questions, with its 95 % paired-bootstrap interval."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_gap needs two equally long, non-empty lists of per-question results")
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    return (sum(diffs) / len(diffs), *_bootstrap(len(diffs), lambda idx: sum(diffs[i] for i in idx) / len(idx), seed))


def _pooled(columns: dict[str, list[float]], idx: list[int], total: str = "cot_nll_sum", count: str = "cot_tokens") -> float:
    """A per-token mean (NLL, KL) over the questions `idx`: their summed totals over their summed tokens."""
    return sum(columns[total][i] for i in idx) / sum(columns[count][i] for i in idx)


def nll_interval(nll: dict[str, list[float]], seed: int = 0) -> tuple[float, float]:
    """Interval of the token-weighted CoT NLL, resampling whole questions (their tokens are not independent)."""
    return _bootstrap(len(nll["cot_tokens"]), lambda idx: _pooled(nll, idx), seed)


def paired_nll_gap(
    a: dict[str, list[float]], b: dict[str, list[float]], seed: int = 0, total: str = "cot_nll_sum", count: str = "cot_tokens"
) -> tuple[float, float, float]:
    """NLL(a) - NLL(b) (or another per-token mean: `total` / `count` columns, e.g. KL) on the same questions,
    with its 95 % paired-bootstrap interval."""
    n = len(a[count])
    if n != len(b[count]) or not n:
        raise ValueError("paired_nll_gap needs per-question values of the same, non-empty question list")
    every = list(range(n))

    def gap(idx: list[int]) -> float:
        return _pooled(a, idx, total, count) - _pooled(b, idx, total, count)

    return (gap(every), *_bootstrap(n, gap, seed))


def method_name(row: dict) -> str:
    return "dense" if row["row"]["importance"] is None else row["row_id"].split("-")[1]


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _acc(flags: list[bool], as_count: bool = False) -> str:
    """The share of True (or `k/n` with `as_count`) with its 95 % interval."""
    if not flags:
        return "—"
    low, high = bootstrap_interval(flags)
    share = f"{sum(flags)}/{len(flags)}" if as_count else f"{sum(flags) / len(flags):.1%}"
    return f"{share} [{low:.0%}, {high:.0%}]"


def _nll(row: dict) -> str:
    value = row["gsm8k"].get("cot_nll")
    if value is None or "gsm8k_nll" not in row:
        return _fmt(value)
    low, high = nll_interval(row["gsm8k_nll"])
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


class Gaps(NamedTuple):
    gsm8k: str = ""
    svamp: str = ""
    both: str = ""
    nll: str = ""


def _gaps(row: dict, reference: dict | None) -> Gaps:
    """Paired gaps of `row` against `reference` (RKU at the same allocation and sparsity): accuracy on GSM8K,
    SVAMP and both (a comparison of methods on one set has half the questions), NLL."""
    if reference is None or reference is row:
        return Gaps()
    mine, theirs = ([r.get(f"{task}_correct") or [] for task in ("gsm8k", "svamp")] for r in (row, reference))
    gaps = [_accuracy_gap(a, b) for a, b in zip(mine, theirs)]
    both = _accuracy_gap(mine[0] + mine[1], theirs[0] + theirs[1]) if all(gaps) else ""
    nll = _nll_gap(row, reference) if "gsm8k_nll" in row and "gsm8k_nll" in reference else ""
    return Gaps(gaps[0], gaps[1], both, nll)


def _accuracy_gap(mine: list[bool], theirs: list[bool]) -> str:
    """The paired accuracy gap on the same questions, `+1.6% [-5%, +8%]`; blank unless both answered the same ones."""
    if not mine or not theirs or len(mine) != len(theirs):
        return ""
    mean, low, high = paired_gap(mine, theirs)
    return f"{mean:+.1%} [{low:+.0%}, {high:+.0%}]"


def _nll_gap(row: dict, reference: dict) -> str:
    """`row`'s CoT NLL minus `reference`'s on the same questions, with its paired interval."""
    return _format_gap(paired_nll_gap(row["gsm8k_nll"], reference["gsm8k_nll"]))


def _format_gap(gap: tuple[float, float, float], digits: int = 2) -> str:
    """A paired gap and its interval, signed: `+0.12 [+0.05, +0.19]`."""
    mean, low, high = gap
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


class Measured(NamedTuple):
    """What must match for two rows to share a table."""

    limit: int  # GSM8K questions
    size: int  # calibration problems
    source: str  # calibration text (rows from before calibration sources existed calibrated on gold solutions)
    cap: int  # answer tokens
    window: int  # calibration tokens
    seed: int  # which calibration problems


def _measured_on(row: dict) -> Measured:
    settings = row["settings"]
    # The cap only changes generated answers: a teacher-forced-only row belongs with the default-cap rows.
    cap = settings["max_new_tokens"] if settings.get("generate", True) else Settings.max_new_tokens
    return Measured(settings["gsm8k_limit"], settings["calib_samples"], settings.get("calib_source", "gold"), cap,
                    settings["calib_max_length"], settings.get("seed", Settings.seed))


def _main_calibration(rows: list[dict], model: str) -> list[dict]:
    """`model`'s rows measured with its most used calibration (size, source, answer cap and window): the other
    calibrations are investigation rows with their own tables."""
    mine = [r for r in rows if r["row"]["model"] == model]
    main = Counter(_measured_on(r)[1:] for r in mine).most_common(1)[0][0]
    return [r for r in mine if _measured_on(r)[1:] == main]


def oneshot_tables(rows: list[dict]) -> list[str]:
    """One table per model, question count and calibration size; gaps are the row minus RKU on the same questions."""
    out: list[str] = []
    groups: dict[tuple[str, int, int], list[dict]] = defaultdict(list)
    dense_of: dict[tuple[str, int, int], dict] = {}
    for row in rows:
        if row["row"]["importance"] is None:
            # The dense model needs no calibration: it heads every table measured on its questions (with its
            # answer cap where it was measured with it).
            measured = _measured_on(row)
            dense_of[(row["row"]["model"], measured.limit, measured.cap)] = row
            dense_of.setdefault((row["row"]["model"], measured.limit, -1), row)
        else:
            groups[(row["row"]["model"], *_measured_on(row))].append(row)
    for (model, limit, calibration, source, tokens, window, seed), pruned in sorted(groups.items()):
        dense = dense_of.get((model, limit, tokens)) or dense_of.get((model, limit, -1))
        settings = pruned[0]["settings"]
        traces = "" if source == "gold" else f" (their {source}-generated traces)"
        cap = ("" if tokens == Settings.max_new_tokens else f", answers up to {tokens} tokens") + (
            "" if window == Settings.calib_max_length else f", {window}-token calibration window") + (
            "" if seed == Settings.seed else f", calibration seed {seed}")
        out += [
            f"### {model}: one-shot pruning, no recovery, first {limit} GSM8K test questions, "
            f"{calibration} calibration problems{traces}{cap}",
            "",
            f"GSM8K: first {limit} test questions, greedy, max {settings['max_new_tokens']} new tokens; "
            f"SVAMP: first {settings['svamp_limit']}; calibration: {settings['calib_samples']} GSM8K-train problems "
            f"(seed {settings['seed']}), ≤ {settings['calib_max_length']} tokens each. Brackets: 95 % bootstrap interval "
            "over questions (NLL: whole questions resampled, token-weighted); the last four columns are the row minus RKU "
            "(with the same attention mode) at the same allocation and sparsity, paired on the same questions (an interval that excludes 0 is a real gap; "
            "negative NLL = better than RKU). — : not measured (rows run with `--no-generate` measure CoT NLL only).",
            "",
            "| allocation | sparsity | method | GSM8K acc | CoT NLL | NLL reasoning | NLL other | SVAMP acc | params "
            "| KV bytes/token | GSM8K − RKU | SVAMP − RKU | both − RKU | NLL − RKU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        if dense:
            g = dense["gsm8k"]
            kv = f"{pruned[0]['report']['kv_cache_bytes_per_token_before']:,}"
            out.append(
                f"| — | 0 % | dense | {_acc(dense['gsm8k_correct'])} | {_nll(dense)} | {_fmt(g.get('cot_nll_reasoning'))} "
                f"| {_fmt(g.get('cot_nll_other'))} | {_acc(dense['svamp_correct'])} | {dense['params']:,} | {kv} | | | | |"
            )
        key = lambda r: (r["row"]["allocation"], r["row"]["sparsity"], r["gsm8k"].get("cot_nll") or 1e9)  # noqa: E731
        for row in sorted(pruned, key=key):
            # The reference is RKU with the same attention mode (rku_mlp for kinetic_mlp, ...).
            reference = "rku" + ATTENTION_SUFFIXES.get(row["row"].get("attention", "groups"), "")
            rku = next(
                (r for r in pruned if method_name(r) == reference and r["row"]["allocation"] == row["row"]["allocation"]
                 and r["row"]["sparsity"] == row["row"]["sparsity"]),
                None,
            )
            gsm8k_gap, svamp_gap, both_gap, nll_gap = _gaps(row, rku)
            g, report = row["gsm8k"], row["report"]
            out.append(
                f"| {row['row']['allocation']} | {report['sparsity']:.1%} | {method_name(row)} | {_acc(row['gsm8k_correct'])} "
                f"| {_nll(row)} | {_fmt(g.get('cot_nll_reasoning'))} | {_fmt(g.get('cot_nll_other'))} "
                f"| {_acc(row['svamp_correct'])} | {row['params']:,} | {report['kv_cache_bytes_per_token_after']:,} "
                f"| {gsm8k_gap} | {svamp_gap} | {both_gap} | {nll_gap} |"
            )
        out.append("")
    return out


def calibration_section(rows: list[dict]) -> list[str]:
    """Rows measured with several calibration sizes side by side, each size's NLL paired against the
    smallest: whether a finding is about the method or about too little calibration data."""
    sizes_of: dict[tuple[str, int, int, int], dict[int, dict]] = defaultdict(dict)
    for row in rows:
        m = _measured_on(row)  # the answer cap: no part of the CoT NLL of gold text
        if "gsm8k_nll" in row and m.source == "gold":  # the size comparison is about the same (gold) calibration text
            sizes_of[(row["row_id"], m.limit, m.window, m.seed)][m.size] = row
    repeated = {key: by_size for key, by_size in sizes_of.items() if len(by_size) > 1}
    if not repeated:
        return []
    sizes = sorted({size for by_size in repeated.values() for size in by_size})
    out = [
        "## Calibration size",
        "",
        "Rows measured with more than one calibration sample (GSM8K-train problems, same seed and length). "
        "CoT NLL of the gold solutions; in brackets the paired gap to the same row with the smallest sample, "
        "on the same questions (negative = more calibration data helped).",
        "",
        "| model | allocation | sparsity | method | questions | " + " | ".join(f"{n} problems" for n in sizes) + " |",
        "|---|---|---|---|---|" + "---|" * len(sizes),
    ]

    def order(item: tuple[tuple[str, int, int, int], dict[int, dict]]) -> tuple:
        meta = next(iter(item[1].values()))["row"]
        return meta["model"], item[0][1], meta["allocation"], meta["sparsity"], item[0][0]

    for (_, limit, _, _), by_size in sorted(repeated.items(), key=order):
        smallest = by_size[min(by_size)]
        cells = []
        for size in sizes:
            row = by_size.get(size)
            if row is None:
                cells.append("—")
            elif row is smallest:
                cells.append(f"{row['gsm8k']['cot_nll']:.3f}")
            else:
                cells.append(f"{row['gsm8k']['cot_nll']:.3f} ({_nll_gap(row, smallest)})")
        meta = smallest["row"]
        out.append(
            f"| {meta['model']} | {meta['allocation']} | {meta['sparsity']:.0%} | {method_name(smallest)} | {limit} | "
            + " | ".join(cells) + " |"
        )
    return out + [""]


def plot_sparsity_curves(rows: list[dict], model: str, path: Path) -> Path | None:
    """Per allocation (rows of panels): accuracy, CoT NLL and its reasoning part vs sparsity, every curve
    starting at the dense model; NLL on a log axis because magnitude-style rows land 10x above the rest."""
    mine = [r for r in rows if r["row"]["model"] == model]
    pruned = [r for r in mine if r["row"]["importance"] is not None]
    if not pruned:
        return None
    dense = [r for r in mine if r["row"]["importance"] is None]
    allocations = sorted({r["row"]["allocation"] for r in pruned})
    panels = [
        ("CoT NLL (log)", lambda r: r["gsm8k"].get("cot_nll")),
        ("CoT NLL, reasoning tokens (log)", lambda r: r["gsm8k"].get("cot_nll_reasoning")),
    ]
    has_accuracy = any(r["gsm8k_correct"] for r in pruned)
    if has_accuracy:  # an empty accuracy panel (NLL-only rows) would only look like a failed plot
        panels.insert(0, ("GSM8K accuracy", lambda r: sum(r["gsm8k_correct"]) / len(r["gsm8k_correct"]) if r["gsm8k_correct"] else None))
    fig, axes = plt.subplots(
        len(allocations), len(panels), figsize=(5 * len(panels), 4.2 * len(allocations)), squeeze=False, sharex=True
    )
    palette = plt.get_cmap("tab20").colors
    colours = {m: palette[i % len(palette)] for i, m in enumerate(sorted({method_name(r) for r in pruned}))}
    for axes_row, allocation in zip(axes, allocations):
        curves: dict[str, list[dict]] = defaultdict(list)
        for r in pruned:
            if r["row"]["allocation"] == allocation:
                curves[method_name(r)].append(r)
        for method, points in sorted(curves.items()):
            points = dense[:1] + sorted(points, key=lambda r: r["row"]["sparsity"])
            xs = [r["row"]["sparsity"] * 100 for r in points]
            style = dict(marker="o", label=method, color=colours[method], linewidth=2.5 if method.startswith("rku") else 1.2)
            for ax, (_, value) in zip(axes_row, panels):
                measured = [(x, value(r)) for x, r in zip(xs, points) if value(r) is not None]
                if measured:
                    ax.plot(*zip(*measured), **style)
        for ax, (title, _) in zip(axes_row, panels):
            ax.set_title(f"{title}, {allocation}")
            ax.set_xlabel("decoder sparsity (%)")
            ax.set_xlim(-2, 42)
            ax.grid(alpha=0.3, which="both")
            if "NLL" in title:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(ScalarFormatter())
        if has_accuracy:
            axes_row[0].set_ylim(-0.01, max(0.2, axes_row[0].get_ylim()[1]))
        axes_row[int(has_accuracy)].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{model}: one-shot pruning, no recovery")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mlp_kept(layers: list[dict]) -> list[float]:
    """Share of MLP channels a model keeps in each layer, from a report's per-layer counts."""
    return [x["mlp_channels"] / x["mlp_channels_total"] for x in layers]


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
        axes[0].plot(xs, _mlp_kept(layers), marker="o", label=label)
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


def _gap_cell(value: float, gap: tuple[float, float, float]) -> str:
    return f"{value:.3f} ({_format_gap(gap, 3)})"


def calibration_source_section(rows: list[dict]) -> list[str]:
    """Rows calibrated on gold solutions and on the dense model's own traces, paired question by question:
    CoT NLL of the gold solutions and KL(dense || pruned) on the dense model's answers and on gold text."""
    by_source: dict[tuple[str, int, int, int, int, int], dict[str, dict]] = defaultdict(dict)
    for row in rows:
        m = _measured_on(row)
        if row.get("gsm8k_kl") and "gsm8k_nll" in row:
            by_source[(row["row_id"], m.limit, m.size, m.cap, m.window, m.seed)][m.source] = row
    pairs = {key: s for key, s in by_source.items() if {"gold", "self"} <= set(s)}
    if not pairs:
        return []
    out = [
        "## Calibration source: gold solutions vs the dense model's own traces",
        "",
        "Each cell: the row calibrated on `self` traces, and in brackets its paired gap to the same row calibrated on "
        "`gold` solutions (95 % bootstrap over questions; negative = `self` is closer / lower). Same questions, "
        "calibration size, seed and sequence length; teacher-forced, no generation. The last pair is the KL on the dense "
        "model's answers restricted to its arithmetic tokens (digits, `=`, operators next to operands: the CoT NLL's "
        "reasoning class); `—`: measured before that split.",
        "",
        "| model | allocation | sparsity | method | questions | calibration | CoT NLL gold: gold-cal | self-cal "
        "| KL dense answers: gold-cal | self-cal | KL gold text: gold-cal | self-cal "
        "| KL dense answers, arithmetic tokens: gold-cal | self-cal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (_, limit, size, _, window, _), pair in sorted(pairs.items(), key=lambda item: (
            item[1]["gold"]["row"]["model"], item[1]["gold"]["row"]["sparsity"], item[0][4], item[0][0])):
        gold, own = pair["gold"], pair["self"]
        cells = [f"{gold['gsm8k']['cot_nll']:.3f}", _gap_cell(own["gsm8k"]["cot_nll"], paired_nll_gap(own["gsm8k_nll"], gold["gsm8k_nll"]))]
        for name in ("kl_to_dense", "kl_to_dense_gold"):
            a, b = own["gsm8k_kl"][name], gold["gsm8k_kl"][name]
            if a["index"] != b["index"]:
                cells += [f"{gold['gsm8k'][name]:.3f}", f"{own['gsm8k'][name]:.3f} (other questions)"]
                continue
            cells += [f"{gold['gsm8k'][name]:.3f}", _gap_cell(own["gsm8k"][name], paired_nll_gap(a, b, total="kl_sum", count="tokens"))]
        # The same KL on the arithmetic tokens (digits, `=`, operators) only: rows measured before the split have none.
        a, b = own["gsm8k_kl"]["kl_to_dense"], gold["gsm8k_kl"]["kl_to_dense"]
        scored = "tokens_reasoning" in a and "tokens_reasoning" in b and a["index"] == b["index"]
        # An interval needs reasoning tokens in most answers (a resample of none has no mean).
        if scored and sum(n > 0 for n in a["tokens_reasoning"]) * 2 > len(a["index"]):
            cells += [f"{gold['gsm8k']['kl_to_dense_reasoning']:.3f}", _gap_cell(
                own["gsm8k"]["kl_to_dense_reasoning"], paired_nll_gap(a, b, total="kl_sum_reasoning", count="tokens_reasoning"))]
        else:
            cells += ["—", "—"]
        meta = gold["row"]
        calibration = f"{size}" + ("" if window == Settings.calib_max_length else f" ({window}-token window)")
        out.append(f"| {meta['model']} | {meta['allocation']} | {meta['sparsity']:.0%} | {method_name(gold)} | {limit} | {calibration} | "
                   + " | ".join(cells) + " |")
    return out + [""]


def _on_common_questions(row: dict, reference: dict, task: str) -> list[tuple[int, bool, bool]]:
    """(question index, `row` correct, `reference` correct) for the `task` questions both answered, in `row`'s order."""
    theirs = dict(zip(reference[f"{task}_indices"], reference[f"{task}_correct"]))
    return [(i, flag, theirs[i]) for i, flag in zip(row[f"{task}_indices"], row[f"{task}_correct"]) if i in theirs]


def _calibration_label(row: dict, with_seed: bool = True) -> str:
    m = _measured_on(row)
    seed = "" if m.seed == Settings.seed or not with_seed else f", seed {m.seed}"
    return f"{m.source}, {m.size} problems{seed}, {m.window}-token window"


def seed_pooled_section(rows: list[dict]) -> list[str]:
    """RKU against each other method calibrated the same way, summed over calibration samples (seeds): one
    sample's gap can be the sample's, so a method gap measured on several is read from their sum."""
    generated = [r for r in rows if r["row"]["importance"] is not None and r["gsm8k_correct"] and r["svamp_correct"]]
    runs: dict[tuple, dict[tuple[str, int], dict]] = defaultdict(dict)
    for row in generated:
        m, meta = _measured_on(row), row["row"]
        runs[(meta["model"], meta["allocation"], meta["sparsity"], m._replace(seed=Settings.seed))][(method_name(row), m.seed)] = row
    pooled: dict[tuple, dict[tuple[str, int], list[int]]] = defaultdict(lambda: defaultdict(list))
    rows_of: dict[tuple, list[str]] = defaultdict(list)
    for (model, allocation, sparsity, measured), by_method in sorted(runs.items(), key=lambda item: item[0][:3]):
        for (method, seed), row in sorted(by_method.items()):
            rku = by_method.get(("rku", seed))
            if method == "rku" or rku is None:
                continue
            setting = f"rku, {allocation} {sparsity:.0%}, first {measured.limit} GSM8K, {_calibration_label(rku, with_seed=False)}"
            comparison = (model, measured.cap, setting, method)
            rows_of[comparison].append(f"seed {seed}")
            for task in ("gsm8k", "svamp"):
                for i, a, b in _on_common_questions(rku, row, task):
                    pooled[comparison][(task, i)].append(int(a) - int(b))
    intro = "RKU against another method calibrated on the same problems, summed over the calibration samples measured"
    lines = _pooled_comparisons(pooled, rows_of, intro)
    return ["## One-shot methods over calibration samples", "", *lines] if lines else []


def calibration_source_accuracy_section(rows: list[dict]) -> list[str]:
    """Generated-answer accuracy of each row against the same row calibrated on gold solutions in another way
    (default window, or the row's own window), paired on the questions both answered: the source and the
    window can each be told apart."""
    generated = [r for r in rows if r["row"]["importance"] is not None and r["gsm8k_correct"] and r["svamp_correct"]]
    by_row: dict[tuple[str, int, int], dict[tuple[str, int, int], list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in generated:
        m = _measured_on(row)
        by_row[(row["row_id"], m.cap, m.size)][(m.source, m.window, m.seed)].append(row)
    out: list[str] = []
    # Per comparison (model, cap, calibration, against): each question's gaps over the rows compared that way.
    pooled: dict[tuple[str, int, str, str], dict[tuple[str, int], list[int]]] = defaultdict(lambda: defaultdict(list))
    rows_of: dict[tuple[str, int, str, str], list[str]] = defaultdict(list)
    seeds_of: dict[tuple[str, int, str, str], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for (_, tokens, _), variants in sorted(by_row.items(), key=lambda item: (
            next(iter(item[1].values()))[0]["row"]["sparsity"], item[0])):
        # One row per calibration: the one measured on the most questions (they agree on the shared ones).
        chosen = {key: max(group, key=lambda r: len(r["gsm8k_correct"])) for key, group in variants.items()}
        for (source, window, seed), row in sorted(chosen.items()):
            for (ref_source, ref_window, ref_seed), gold in sorted(chosen.items()):
                # Against gold text calibrated on the same problems (seed), in another window or source.
                if ref_source != "gold" or ref_seed != seed or (ref_source, ref_window) == (source, window):
                    continue
                if source == "gold" and window < ref_window:
                    continue  # one direction per pair of gold windows
                meta = row["row"]
                comparison = (meta["model"], tokens, _calibration_label(row), _calibration_label(gold))
                name = f"{method_name(row)} {meta['sparsity']:.0%}"
                rows_of[comparison].append(name)
                # The same comparison over every calibration sample (seed): summed only where more than one was measured.
                over_seeds = (meta["model"], tokens, _calibration_label(row, with_seed=False) + ", all seeds",
                              _calibration_label(gold, with_seed=False) + ", all seeds")
                seeds_of[over_seeds][seed].append(name)
                cells, pooled_row, pooled_gold = [], [], []
                for task in ("gsm8k", "svamp"):
                    common = _on_common_questions(row, gold, task)
                    mine, theirs = [a for _, a, _ in common], [b for _, _, b in common]
                    pooled_row += mine
                    pooled_gold += theirs
                    cells.append(_count_gap(mine, theirs))
                    for i, a, b in common:
                        pooled[comparison][(task, i)].append(int(a) - int(b))
                        pooled[over_seeds][(task, i)].append(int(a) - int(b))
                cells.append(_count_gap(pooled_row, pooled_gold))
                out.append(f"| {meta['model']} | {meta['allocation']} | {meta['sparsity']:.0%} | {method_name(row)} | {tokens} "
                           f"| {_calibration_label(row)} | {_calibration_label(gold)} | " + " | ".join(cells) + " |")
    if not out:
        return []
    for comparison, seeds in seeds_of.items():
        if len(seeds) < 2:
            pooled.pop(comparison, None)  # one sample: its sum is already the seeded line
        rows_of[comparison] = [f"seed {seed} ({', '.join(names)})" for seed, names in sorted(seeds.items())]
    return [
        "## Calibration source: accuracy",
        "",
        "Greedy answers of a row against the same row calibrated on `gold` solutions in another way (the default "
        f"{Settings.calib_max_length}-token window, or the row's own window), on the questions both answered: correct "
        "answers of each, and the difference in questions with its 95 % paired-bootstrap interval (positive = the row "
        "solved more than the one it is compared with).",
        "",
        "| model | allocation | sparsity | method | answer cap | calibration | against | GSM8K | SVAMP | both |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *out,
        "",
        *_pooled_comparisons(pooled, rows_of),
    ]


def _pooled_comparisons(
    pooled: dict[tuple, dict[tuple[str, int], list[int]]],
    rows_of: dict[tuple, list[str]],
    intro: str = "The same comparisons summed over the rows that made them",
) -> list[str]:
    """The gaps of every comparison made on more than one row, summed: the bootstrap resamples questions, each
    carrying its gaps in every row, since the rows answered the same questions."""
    lines = []
    for comparison, by_question in sorted(pooled.items()):
        if len(rows_of[comparison]) < 2:
            continue
        model, tokens, label, against = comparison
        lines.append(f"| {model} | {tokens} | {label} | {against} | {', '.join(rows_of[comparison])} | {len(by_question)} "
                     f"| {_summed_gap(by_question)} |")
    if not lines:
        return []
    return [f"{intro} (questions resampled with all their rows' gaps):", "",
            "| model | answer cap | calibration | against | rows | questions | solved − against |",
            "|---|---|---|---|---|---|---|", *lines, ""]


def _summed_gap(by_question: dict[Any, list[int]]) -> str:
    """The gaps of several rows summed, with the interval from resampling questions, each carrying all its rows' gaps
    (the rows answered the same questions, so one question's gaps are not independent): `+5 [-1, +11]`."""
    gaps = [sum(v) for v in by_question.values()]
    low, high = _bootstrap(len(gaps), lambda idx: sum(gaps[i] for i in idx))
    return f"{sum(gaps):+d} [{low:+.0f}, {high:+.0f}]"


def _question_gap(mine: list[bool], theirs: list[bool]) -> str:
    """The paired gap in solved questions with its interval: `+2 [-1, +5]`."""
    n = len(mine)
    mean, low, high = paired_gap(mine, theirs)
    return f"{mean * n:+.0f} [{low * n:+.0f}, {high * n:+.0f}]"


def _unfitted(result: dict) -> list[bool]:
    """A task's per-question results on the questions no allocation was chosen on (`UNFITTED`)."""
    return [c for i, c in zip(result["indices"], result["correct"]) if i >= PICKED_ON]


def _kept_and_new(mine: list[bool], dense: list[bool]) -> str:
    """`kept / new`: the questions solved by both, and by `mine` alone. A pruned model's share of dense accuracy is
    the balance of both, so the same share can hide many answers lost and as many gained."""
    solved_by_dense = [d for m, d in zip(mine, dense, strict=True) if m]
    return f"{sum(solved_by_dense)} / {solved_by_dense.count(False)}"


def _count_gap(mine: list[bool], theirs: list[bool]) -> str:
    """`a vs b of n: gap [low, high]`."""
    return f"{sum(mine)} vs {sum(theirs)} of {len(mine)}: {_question_gap(mine, theirs)}"


def merge_nll_twins(group: list[dict]) -> dict:
    """One measurement of a row from its copies: the row run with generation, with CoT NLL from its NLL-only
    twin if it lacks per-question NLL, or the NLL-only row where no full row exists (NLL is the same
    teacher-forced pass either way)."""
    full = [r for r in group if r["settings"].get("generate", True)]
    nll = [r for r in group if not r["settings"].get("generate", True) and "gsm8k_nll" in r]
    row = dict(full[0] if full else group[0])
    if "gsm8k_nll" not in row and nll:
        cot = {k: v for k, v in nll[0]["gsm8k"].items() if k.startswith("cot_")}
        row.update(gsm8k={**row["gsm8k"], **cot}, gsm8k_nll=nll[0]["gsm8k_nll"])
    twin = next((r for r in nll if r.get("gsm8k_kl")), None)
    if not row.get("gsm8k_kl") and twin is not None:  # KL to dense, measured by an NLL-only twin
        kl = {k: v for k, v in twin["gsm8k"].items() if k.startswith("kl_")}
        row.update(gsm8k={**row["gsm8k"], **kl}, gsm8k_kl=twin["gsm8k_kl"])
    return row


def oneshot_rows() -> list[dict]:
    """One row per (row id, question count, calibration size), merged over the oneshot* folders."""
    groups: dict[tuple[str, int, int, str], list[dict]] = defaultdict(list)
    for folder in sorted(p for p in RESULTS.glob("oneshot*") if p.is_dir()):
        for row in load_rows(folder.name):
            groups[(row["row_id"], *_measured_on(row))].append(row)
    return [merge_nll_twins(group) for group in groups.values()]


def peer_rows() -> list[dict]:
    """One row per (peer row id, question count), merged over `peer` and its NLL-only twin `peer_nll`."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in load_rows("peer") + load_rows("peer_nll"):
        groups[(row["row_id"], row["settings"]["limit"])].append(row)
    return [merge_nll_twins(group) for _, group in sorted(groups.items())]


def peer_section(rows: list[dict], oneshot: list[dict]) -> list[str]:
    """Torch-Pruning rows, evaluated by the same code; how each differs from the engine is listed once.

    The paired gap is against the engine's RKU on Torch-Pruning's kind of structures (`rku_qheads`,
    uniform allocation, same sparsity and questions). Only where both keep the same number of heads and
    channels in every layer do the scores alone differ; the structures column says whether they do.
    """
    lines = [
        "## Peer: Torch-Pruning, same model and parameter count",
        "",
        "Last column: row minus the engine's `rku_qheads` at uniform allocation (query heads, the same number per "
        "layer, as Torch-Pruning prunes), paired on the same questions (negative = better than RKU). Structures: "
        "query heads + MLP channels kept per layer by the row and by that RKU row.",
        "",
        "| row | sparsity | GSM8K acc | CoT NLL | NLL reasoning | NLL other | SVAMP acc | params | structures | NLL − RKU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r["gsm8k"]
        rku = next(
            (o for o in oneshot if o["row"]["model"] == r["model"] and method_name(o) == "rku_qheads" and o["row"]["allocation"] == "uniform"
             and round(o["row"]["sparsity"], 2) == round(r["sparsity"], 2) and o["settings"]["gsm8k_limit"] == r["settings"]["limit"]),
            None,
        )
        lines.append(
            f"| {r['row_id']} | {r['achieved_sparsity']:.1%} | {_acc(r['gsm8k_correct'])} | {_nll(r)} "
            f"| {_fmt(g.get('cot_nll_reasoning'))} | {_fmt(g.get('cot_nll_other'))} | {_acc(r['svamp_correct'])} | {r['params']:,} "
            f"| {_structures(r, rku)} | {_gaps(r, rku).nll} |"
        )
    differences = dict.fromkeys(d for r in rows for d in r.get("differences_from_engine", []))
    lines += ["", "How these rows differ from the engine's (recorded in each row as `differences_from_engine`):", ""]
    return lines + [f"- {d}" for d in differences] + [""]


def _structures(peer: dict, rku: dict | None) -> str:
    """`same` when the peer row and the RKU row keep equal heads and channels in every layer, else both."""
    info = peer["torch_pruning"]
    mine = [(info["kept_query_heads_per_layer"], c) for c in info["kept_mlp_channels_per_layer"]]
    if rku is None:
        return _per_layer(mine)
    theirs = [(layer["heads"], layer["mlp_channels"]) for layer in rku["report"]["layers"]]
    return "same" if mine == theirs else f"differ: {_per_layer(mine)}; RKU {_per_layer(theirs)}"


def _per_layer(kept: list[tuple[int, int]]) -> str:
    return f"{_span([h for h, _ in kept])} heads + {_span([c for _, c in kept])} ch"


def _span(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}–{max(values)}"


def efficiency_section(rows: list[dict]) -> list[str]:
    """Ratios measured side by side in one process (pruned / dense, RKU / Taylor)."""
    lines = ["## Efficiency (ratios from one process; see each row for the raw repetitions)", ""]
    for r in rows:
        env = f"{r['environment']['device']}, {r['environment']['threads']} threads"
        tables = {key: value for key, value in r.items() if key.startswith("ratios_")}
        for key, ratios in tables.items():
            title = "pruned / dense" if key == "ratios_pruned_over_dense" else (
                ("checkpointed " if "checkpointed" in key else "") + "RKU scoring / Torch-Pruning Taylor scoring"
            )
            lines += [f"**{r['row_id']}** ({title}; {env}; commit {r['commit'][:7]})", "", "| quantity | ratio |", "|---|---|"]
            lines += [f"| {name} | {value:.3f} |" for name, value in ratios.items() if value is not None]
            lines.append("")
    return lines


def llama_cpp_section(rows: list[dict]) -> list[str]:
    """Decode speed of the pruned GGUF over the dense GGUF in llama.cpp, beside the transformers ratio."""
    lines = ["## llama.cpp decode (pruned GGUF / dense GGUF, interleaved in one process)", "",
             "| row | dense tokens/s | pruned tokens/s | ratio median [min, max] | transformers ratio | ideal | settings | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed, ratio, settings = r["decode_b1_tokens_per_s"], r["ratio_pruned_over_dense"], r["settings"]
        report = r["pruned_model"]["report"]
        theirs = r["transformers"]["decode_b1_tokens_per_s"] if r["transformers"] else None
        spans = [f"{speed[k]['median']:.1f} [{speed[k]['min']:.1f}, {speed[k]['max']:.1f}]" for k in ("dense", "pruned")]
        lines.append(
            f"| {r['row_id']} | {spans[0]} | {spans[1]} | {ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}] "
            f"| {_fmt(theirs)} | {report['total_params_before'] / report['total_params_after']:.3f} "
            f"| {settings['dtype']}, {settings['threads']} thread(s), {settings['reps']} reps, flash_attn {settings['flash_attn']} "
            f"| {r['commit'][:7]} |"
        )
    return lines + ["", "Shared machine: other jobs ran on the same cores (load averages in each row); "
                    "the spread of the interleaved per-repeat ratios is the measure of that.", ""]


#: Validation metrics plotted per round, with their axis labels.
RECOVER_PANELS = {
    "val/gsm8k_acc": "GSM8K accuracy",
    "val/ood_acc": "OOD (SVAMP) accuracy",
    "val/kl_to_dense": "KL(dense || model) per token, dense answers",
    "val/cot_nll": "CoT NLL of gold text (nats/token)",
}


def recover_plot_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Runs by the preset they repeat (seeds together), in first-seen order: one row of panels each, since runs
    are compared only within a preset and one panel holding every run was a tangle once there were fifty."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[preset_seed(r["preset"])[0]].append(r)
    return dict(groups)


def _plot_recover_rounds(rows: list[dict], panels: list[str], plot_path: Path) -> None:
    """Validation metrics per round: a row of panels per preset, colour per method, line style per seed."""
    groups = recover_plot_groups(rows)
    columns = max(len(panels), 1)
    fig, axes = plt.subplots(len(groups), columns, figsize=(5 * columns, 3 * len(groups)), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    styles = ("-", "--", ":", "-.")
    for axes_row, (preset, runs) in zip(axes, groups.items()):
        for r in sorted(runs, key=lambda r: (r["method"], preset_seed(r["preset"])[1])):
            seed = preset_seed(r["preset"])[1]
            for ax, metric in zip(axes_row, panels):
                points = [(x["sparsity"], x["metrics"][metric]) for x in r["report"]["rounds"] if metric in x.get("metrics", {})]
                if points:
                    ax.plot(*zip(*points), marker="o", label=f"{r['method']}, seed {seed}", color=colours[r["method"]],
                            linestyle=styles[seed % len(styles)], linewidth=2.5 if r["method"] == "rku" else 1.2)
        for ax, metric in zip(axes_row, panels):
            ax.set_title(f"{preset}: {RECOVER_PANELS[metric]}", fontsize=9)
            ax.grid(alpha=0.3)
        if axes_row[0].get_legend_handles_labels()[0]:
            axes_row[0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("decoder sparsity after the round's recovery")
    fig.tight_layout()
    fig.savefig(plot_path, dpi=80)
    plt.close(fig)


def recover_section(rows: list[dict], plot_path: Path) -> list[str]:
    """Every round of each prune-and-recover run (train.py), one table per method, and metrics per round.

    Runs are compared only within a preset (same config and overrides); the plot has a row per preset and a
    column per validation metric that any run logged (CoT NLL always, GSM8K and OOD accuracy when generating).
    """
    lines = ["## Prune and recover (`train.py`, LoRA recovery between rounds)", ""]
    panels = [m for m in RECOVER_PANELS if any(m in x.get("metrics", {}) for r in rows for x in r["report"]["rounds"])]
    for r in rows:
        lines += [f"**{r['row_id']}**: `{r['train_command']}` ({_recover_time(r)}, commit {r['commit'][:7]})", "",
                  markdown_table(r["report"]["rounds"]), ""]
    for preset in dict.fromkeys(r["preset"] for r in rows if "final" in r):
        lines += _recover_final_table([r for r in rows if "final" in r and r["preset"] == preset])
    lines += _recover_answers_table(rows)
    _plot_recover_rounds(rows, panels, plot_path)
    return lines + [f"![Validation metrics per round, a row per preset](results/{plot_path.name})", ""]


def recover_layer_profiles(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Share of MLP channels each run's final model keeps per layer, by preset then method, for the runs that keep
    different shares in different layers (a uniform run's line is flat): where a score spends a global budget."""
    profiles: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for r in rows:
        kept = _mlp_kept(r["report"]["rounds"][-1].get("layers", []))
        if len(set(kept)) > 1:
            profiles[r["preset"]][r["method"]] = kept
    return dict(profiles)


def recover_layers_section(rows: list[dict], path: Path) -> list[str]:
    """One panel per preset of `recover_layer_profiles`, one line per method in the same colour in every panel."""
    profiles = recover_layer_profiles(rows)
    if not profiles:
        return []
    columns = min(3, len(profiles))
    grid_rows = math.ceil(len(profiles) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(5.5 * columns, 3.8 * grid_rows), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(sorted({m for runs in profiles.values() for m in runs}))}
    for ax, (preset, runs) in zip(axes.flat, profiles.items()):
        for method, kept in runs.items():
            ax.plot(range(len(kept)), kept, marker="o", markersize=3, label=method, color=colours[method])
        ax.set_title(preset, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("MLP channels kept")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(profiles):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ["MLP channels each recovered model keeps per layer, for the presets whose allocation is not uniform "
            "(the final round of each run; read from its report):", "",
            f"![MLP channels kept per layer after recovery](results/{path.name})", ""]


def _recover_time(row: dict) -> str:
    device = row.get("environment", {}).get("device", "cpu")
    threads = f"threads: {row['threads']}" + ("" if device == "cpu" else f", on one {device}")
    if row.get("resumed_from"):
        return f"{threads}, {row['compute_s'] / 60:.0f} min over several sittings, resumed after round {row['resumed_from']['rounds_done']}"
    return f"{threads}, {row['wall_s'] / 60:.0f} min"


def _answers(row: dict) -> dict[tuple[int, str], dict[int, bool]]:
    """A run's kept validation answers: (round, task) -> {question index: correct}."""
    path = RESULTS / "recover" / f"{row['row_id']}.generations.jsonl"
    found: dict[tuple[int, str], dict[int, bool]] = defaultdict(dict)
    if path.is_file():
        for line in path.read_text().splitlines():
            answer = json.loads(line)
            found[(answer["round"], answer["task"])][answer["index"]] = bool(answer["correct"])
    return found


#: The methods a run is paired with in its own preset: the product, then the best baseline the reasoning issue's goal
#: is set against; a run pairs with those listed before its own method, so no pair is shown twice.
PAIRED_WITH = ("rku", "flap")


def _paired_runs(rows: list[dict], row: dict) -> list[dict]:
    """The runs among `rows` that `row` is paired with by method: its preset's runs of `PAIRED_WITH`, and every run of
    its reference preset (`benchmarks.recover.REFERENCES`) where it changes one thing (what is pruned, or the budget)."""
    own = PAIRED_WITH[: PAIRED_WITH.index(row["method"])] if row["method"] in PAIRED_WITH else PAIRED_WITH
    return [x for x in rows if x is not row and (x["preset"] == row["preset"] and x["method"] in own
                                                  or x["preset"] == REFERENCES.get(row["preset"]))]


def _rku_run(rows: list[dict], row: dict) -> dict | None:
    """The RKU run `row` is paired with: its preset's, else its reference preset's (None for RKU's own run)."""
    runs = [x for x in _paired_runs(rows, row) if x["method"] == "rku"]
    return min(runs, key=lambda x: x["preset"] != row["preset"], default=None)


def _pair_label(row: dict, other: dict) -> str:
    """`method − method (preset)`, or `preset − preset (method)` for one method, naming both of what differs."""
    if row["preset"] == other["preset"]:
        return f"{row['method']} − {other['method']} (`{row['preset']}`)"
    if row["method"] == other["method"]:
        return f"`{row['preset']}` − `{other['preset']}` ({row['method']})"
    return f"{row['method']} (`{row['preset']}`) − {other['method']} (`{other['preset']}`)"


#: `benchmarks.recover_kl`'s token classes: (label, per-question KL column, its token column).
KL_CLASSES = (("all", "kl_sum", "tokens"), ("arithmetic", "kl_sum_reasoning", "tokens_reasoning"), ("other", "kl_sum_other", "tokens_other"))


def _kl_gap_cells(row: dict, other: dict, text: str) -> list[str]:
    """Paired per-token KL gaps on one text set, per token class; none where a question has no token of the class
    (a resample of only those would have no mean)."""
    a, b = row[text]["per_question"], other[text]["per_question"]
    if a["index"] != b["index"]:
        return ["(other questions)"] * len(KL_CLASSES)
    return [_format_gap(paired_nll_gap(a, b, total=total, count=count), 3) if min(a[count]) > 0 and min(b[count]) > 0 else "—"
            for _, total, count in KL_CLASSES]


def recover_kl_section(rows: list[dict]) -> list[str]:
    """Recovered models' KL to dense split into arithmetic and other tokens (`benchmarks.recover_kl`), with paired
    gaps between the runs `_paired_runs` pairs."""
    texts = (("dense", "dense answers"), ("gold", "gold text"))
    columns = " | ".join(f"{label}: {c}" for _, label in texts for c, _, _ in KL_CLASSES)
    lines = [
        "## Where recovered models drift: KL to dense on the arithmetic tokens", "",
        "KL(dense || model) per token, teacher-forced on a row's validation questions, over all tokens, the arithmetic "
        "ones (numbers, `=`, operators: the CoT NLL's reasoning class) and the rest; `logged` is the row's own last "
        "value, which the export must reproduce.", "",
        f"| row | {columns} | arithmetic share of tokens / of KL (dense answers) | logged |",
        "|---|" + "---|" * (2 * len(KL_CLASSES) + 2),
    ]
    for row in rows:
        dense = row["dense"]
        cells = [_fmt(row[text][key]) for text, _ in texts for key in ("kl", "kl_reasoning", "kl_other")]
        check = "" if row["reproduces"] else " (**not reproduced**)"
        lines.append(f"| {row['row_id']} | " + " | ".join(cells) + f" | {dense['reasoning_token_share']:.0%} / "
                     f"{dense['reasoning_kl_share']:.0%} | {dense['logged']:.3f}{check} |")
    pairs = [(row, other) for row in rows for other in _paired_runs(rows, row)]
    if pairs:
        lines += ["", "Paired gaps, questions resampled (95 % interval):", "",
                  f"| pair | {columns} |",
                  "|---|" + "---|" * (2 * len(KL_CLASSES))]
        lines += [f"| {_pair_label(row, other)} | " + " | ".join(cell for text, _ in texts for cell in _kl_gap_cells(row, other, text))
                  + " |" for row, other in pairs]
    return lines + [""]


def _recover_answers_table(rows: list[dict]) -> list[str]:
    """Accuracy per round from the kept answers, with paired gaps to the RKU run `_rku_run` pairs it with and to the
    same method's run of the preset's gold-CE baseline (`benchmarks.recover.BASELINES`), per task and both together."""
    answers = {r["row_id"]: _answers(r) for r in rows}
    kept = [r for r in rows if answers[r["row_id"]]]
    if not kept:
        return []
    lines = ["Accuracy per round from the kept answers (`<row>.generations.jsonl`; gaps paired per question, in solved "
             "questions, with the RKU run of the same preset (or, named in the cell, of the preset a preset that changes "
             "one thing, what is pruned or the recovery budget, is paired with, `benchmarks.recover.REFERENCES`) and with the same method's run of the preset's gold-CE "
             "baseline, named in the cell, `benchmarks.recover.BASELINES`; *both*: GSM8K and OOD together):", "",
             "| row | round | GSM8K | GSM8K − RKU | GSM8K − gold CE | OOD | OOD − RKU | OOD − gold CE | both − RKU | both − gold CE |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def results(row: dict | None, round_index: int, tasks: tuple[str, ...]) -> dict[tuple[str, int], bool]:
        """A run's answers in one round, keyed by (task, question index); none for no run."""
        found = answers[row["row_id"]] if row else {}
        return {(t, i): ok for t in tasks for i, ok in found.get((round_index, t), {}).items()}

    for r in kept:
        rku = _rku_run(kept, r)
        baseline = next((x for preset in BASELINES.get(r["preset"], ()) for x in kept
                         if x["method"] == r["method"] and x["preset"] == preset), None)
        for round_index in sorted({k[0] for k in answers[r["row_id"]]}):
            cells = []
            for tasks in (("gsm8k",), ("ood",), ("gsm8k", "ood")):
                mine = results(r, round_index, tasks)
                if len(tasks) == 1:
                    low, high = bootstrap_interval(list(mine.values()))
                    cells.append(f"{sum(mine.values())}/{len(mine)} [{low:.0%}, {high:.0%}]" if mine else "—")
                for other in (rku, baseline):
                    theirs = results(other, round_index, tasks)
                    paired = mine and set(theirs) == set(mine)
                    gap = _question_gap([mine[k] for k in sorted(mine)], [theirs[k] for k in sorted(mine)]) if paired else ""
                    cells.append(f"{gap} (`{other['preset']}`)" if gap and other["preset"] != r["preset"] else gap)
            lines.append(f"| {r['row_id']} | {round_index} | " + " | ".join(cells) + " |")
    return lines + [""]


def _recover_final_table(rows: list[dict]) -> list[str]:
    """The exported models of one preset, scored like the one-shot rows, paired with that preset's RKU run."""
    rku = next((r for r in rows if r["method"] == "rku"), None)
    lines = [
        f"Preset `{rows[0]['preset']}`: exported models scored like the one-shot rows (CoT NLL of the first "
        f"{rows[0]['final']['gsm8k_limit']} GSM8K test questions, intervals over questions, gap paired with the RKU run):",
        "",
        "| row | sparsity | params | CoT NLL | NLL reasoning | NLL other | NLL − RKU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        final, last = r["final"], r["report"]["rounds"][-1]
        gap = ""
        if rku is not None and rku is not r:
            mean, low, high = paired_nll_gap(final["gsm8k_nll"], rku["final"]["gsm8k_nll"])
            gap = f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"
        lines.append(
            f"| {r['row_id']} | {last['sparsity']:.1%} | {last['params']:,} | {_nll(final)} "
            f"| {_fmt(final['gsm8k'].get('cot_nll_reasoning'))} | {_fmt(final['gsm8k'].get('cot_nll_other'))} | {gap} |"
        )
    return lines + [""]


def _controls_cell(row: dict) -> str:
    """A `recover_answers` row's controls, both tasks: `unchanged of regenerated`."""
    return f"{sum(row[t]['controls_unchanged'] for t in ('gsm8k', 'ood'))} of {sum(row[t]['controls'] for t in ('gsm8k', 'ood'))}"


def _baseline_pairs(rows: list[dict], comparable: Callable[[dict, dict], bool]) -> list[tuple[dict, dict]]:
    """Each `recover_answers` row with the row of its preset's first baseline (`recover.BASELINES`: a KD preset's
    gold-CE one), same method, where `comparable(row, baseline)` holds."""
    return [(r, b) for r in rows for preset in BASELINES.get(r["preset"], ())[:1] for b in rows
            if b["preset"] == preset and b["method"] == r["method"] and comparable(r, b)]


def cap_section(rows: list[dict]) -> list[str]:
    """Recover rows' final answers under a longer cap (`benchmarks.recover_answers --cap`): what the cap took from each
    model, and each KD row against its gold-CE baseline under both caps (both tasks together)."""
    lines = [
        "## Answer cap: recovered models' final answers with room to finish",
        "",
        "`python -m benchmarks.recover_answers --cap N`: each row's exported model regenerates the final round's answers that used "
        "the whole cap (*regenerated*: how many, and how many repeat the old answer up to the old cap) and, as a control, "
        "its first finished answers per task, which must come back unchanged; *same model*: a rebuilt model logged the "
        "row's teacher-forced metrics every round. Gaps paired per question, in solved questions.",
        "",
        "| row | cap | GSM8K | OOD | both − at old cap | cut | regenerated (same start) | controls unchanged | same model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        old = r["base_cap"]
        # On the row's own questions (the first entries; a row may add more with --questions).
        before = {t: r[t][f"correct_at_{old}"] for t in ("gsm8k", "ood")}
        now = {t: r[t]["correct"][: len(before[t])] for t in ("gsm8k", "ood")}
        cut = [sum(r[t][f"cut_at_{old}"]) for t in ("gsm8k", "ood")], [sum(r[t]["cut"][: len(before[t])]) for t in ("gsm8k", "ood")]
        lines.append(
            f"| {r['row_id']} | {old} → {r['cap']} | "
            + " | ".join(f"{sum(before[t])} → {sum(now[t])} of {len(now[t])}" for t in ("gsm8k", "ood"))
            + f" | {_question_gap(now['gsm8k'] + now['ood'], before['gsm8k'] + before['ood'])} | {sum(cut[0])} → {sum(cut[1])} "
            f"| {sum(r[t]['cut_regenerated'] for t in ('gsm8k', 'ood'))} ({sum(r[t]['cut_same_start'] for t in ('gsm8k', 'ood'))}) "
            f"| {_controls_cell(r)} | {'yes' if r['same_model'] else 'no'} |"
        )
    if pairs := _baseline_pairs(rows, lambda r, b: b["cap"] == r["cap"]):
        lines += ["", "| pair | at the old cap | at the longer cap |", "|---|---|---|"]
        for r, b in pairs:
            old = r["base_cap"]
            cells = [_count_gap(r["gsm8k"][key] + r["ood"][key], b["gsm8k"][key] + b["ood"][key]) for key in (f"correct_at_{old}", "correct")]
            lines.append(f"| `{r['preset']}` − `{b['preset']}` ({r['method']}) | {cells[0]} | {cells[1]} |")
    return lines + [""]


def _dense_on(oneshot: list[dict], task: str, indices: list[int], cap: int) -> list[bool] | None:
    """The dense model's results on these questions of `task` (`gsm8k` / `svamp`) with this cap, from any one-shot row."""
    for row in oneshot:
        if row["row_id"].endswith("-dense") and row["settings"]["max_new_tokens"] == cap:
            found = dict(zip(row.get(f"{task}_indices", []), row.get(f"{task}_correct", [])))
            if all(i in found for i in indices):
                return [bool(found[i]) for i in indices]
    return None


def questions_needed(a: list[bool], b: list[bool], z: float = 1.96) -> int | None:
    """Questions a paired comparison of a and b would need for its 95 % interval to exclude zero, if the gap per
    question and its spread stayed as measured here (normal approximation); None where there is no gap."""
    diffs = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / len(diffs)
    if mean == 0 or len(diffs) < 2:
        return None
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return math.ceil(z * z * variance / (mean * mean))


def _resolving_table(pairs: list[tuple[str, dict, dict]]) -> list[str]:
    """For each pair of recovered models on the same questions: how far the measured gap is from being resolved."""
    lines = ["", "How many questions each comparison would need to be resolved (its 95 % interval to exclude zero), if the "
             "gap per question and its spread stayed as measured here (normal approximation, both tasks together):", "",
             "| comparison | questions | gap | answers that differ | questions needed |", "|---|---|---|---|---|"]
    for label, r, b in pairs:
        mine, theirs = _both(r), _both(b)
        needed = questions_needed(mine, theirs)
        lines.append(f"| {label} | {len(mine)} | {sum(mine) - sum(theirs):+d} | {sum(x != y for x, y in zip(mine, theirs))} "
                     f"| {'—' if needed is None else f'{needed:,}'} |")
    return lines


def _both(row: dict) -> list[bool]:
    """A `recover_answers` row's per-question results on GSM8K then OOD: both tasks as one paired sample."""
    return row["gsm8k"]["correct"] + row["ood"]["correct"]


def _same_questions(a: dict, b: dict) -> bool:
    """Whether two `recover_answers` rows answered the same questions of both tasks, so they pair per question."""
    return all(a[t]["indices"] == b[t]["indices"] for t in ("gsm8k", "ood"))


def _question_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """The `recover_answers` rows compared per question: each with the runs `_paired_runs` pairs it with by method,
    then each KD row with its gold-CE baseline's (`_baseline_pairs`), where both answered the same questions."""
    by_method = [(r, other) for r in rows for other in _paired_runs(rows, r) if _same_questions(r, other)]
    return by_method + _baseline_pairs(rows, _same_questions)


def questions_section(rows: list[dict], oneshot: list[dict]) -> list[str]:
    """Recover rows' final answers on more questions (`benchmarks.recover_answers --questions`): each against the
    dense model on the same questions, then each against the runs `_paired_runs` names and each KD row against its
    gold-CE baseline, per task and both together."""
    lines = [
        "## More questions: recovered models' final answers",
        "",
        "`python -m benchmarks.recover_answers --questions N`: the row's own final answers, then its exported model's "
        "answers to the next questions of each set (*controls*: the row's finished answers regenerated, which must come "
        "back unchanged). Gaps paired per question, in solved questions; *of dense*: solved over the dense model's solved "
        "on the same questions (dense from the one-shot rows, same cap); *kept / new*: of the GSM8K questions it solves, "
        "those the dense model solves too and those it misses.",
        "",
        "| row | GSM8K | dense | − dense | of dense | kept / new | OOD | dense | − dense | controls unchanged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for task, name in (("gsm8k", "gsm8k"), ("ood", "svamp")):
            mine = r[task]["correct"]
            low, high = bootstrap_interval(mine)
            dense = _dense_on(oneshot, name, r[task]["indices"], r["cap"])
            cells += [f"{sum(mine)}/{len(mine)} [{low:.0%}, {high:.0%}]", f"{sum(dense)}/{len(dense)}" if dense else "—",
                      _question_gap(mine, dense) if dense else ""]
            if task == "gsm8k":
                cells.append(f"{sum(mine) / sum(dense):.0%}" if dense and sum(dense) else "")
                cells.append(_kept_and_new(mine, dense) if dense else "")
        lines.append(f"| {r['row_id']} | " + " | ".join(cells) + f" | {_controls_cell(r)} |")
    compared = [(_pair_label(r, other), r, other) for r, other in _question_pairs(rows)]
    if compared:
        lines += ["", UNFITTED, "",
                  f"| pair | GSM8K | OOD | both | GSM8K, from question {PICKED_ON} on |", "|---|---|---|---|---|"]
        for label, r, b in compared:
            cells = [_count_gap(r[t]["correct"], b[t]["correct"]) for t in ("gsm8k", "ood")]
            cells.append(_count_gap(_both(r), _both(b)))
            mine, theirs = _unfitted(r["gsm8k"]), _unfitted(b["gsm8k"])
            cells.append(_count_gap(mine, theirs) if mine else "—")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += _resolving_table(compared)
    return lines + [""]


def _add_question_gaps(into: dict[tuple[str, int], list[int]], r: dict, other: dict) -> None:
    """Append `r` − `other` on each (task, question) two `recover_answers` rows share (`_same_questions`) to `into`."""
    for task in ("gsm8k", "ood"):
        for i, mine, theirs in zip(r[task]["indices"], r[task]["correct"], other[task]["correct"], strict=True):
            into[(task, i)].append(int(mine) - int(theirs))


def _task_gap_cells(gaps: dict[tuple[str, int], list[int]]) -> list[str]:
    """Summed gaps (`_add_question_gaps`) on GSM8K, on OOD and on both."""
    return [*(_summed_gap({k: v for k, v in gaps.items() if k[0] == task}) for task in ("gsm8k", "ood")), _summed_gap(gaps)]


def recovery_loss_section(rows: list[dict]) -> list[str]:
    """Every KD row against its gold-CE baseline (`_baseline_pairs`), summed per method and over all of them: each
    pair alone is a tie at these counts, and the default recovery loss should be read from all of them together.
    One pair per method and KD preset, the one on the most questions: a longer `--questions` run repeats a shorter
    one's answers, so summing both would count those questions twice."""
    widest: dict[tuple[str, str], tuple[dict, dict]] = {}
    for r, b in _baseline_pairs(rows, _same_questions):
        key = (r["method"], r["preset"])
        if key not in widest or len(_both(r)) > len(_both(widest[key][0])):
            widest[key] = (r, b)
    pairs = list(widest.values())
    if len(pairs) < 2:
        return []
    groups = {m: [(r, b) for r, b in pairs if r["method"] == m] for m in sorted({r["method"] for r, _ in pairs})}
    lines = []
    for name, group in [*groups.items(), ("all", pairs)]:
        gaps: dict[tuple[str, int], list[int]] = defaultdict(list)
        for r, b in group:
            _add_question_gaps(gaps, r, b)
        presets = ", ".join(f"`{r['preset']}`" for r, _ in group) if name != "all" else f"{len(group)} pairs"
        lines.append(f"| {name} | {presets} | " + " | ".join(_task_gap_cells(gaps)) + " |")
    return ["## Recovery loss over every pair: KD on self traces − CE on gold text", "",
            "Each KD run against its preset's gold-CE baseline (`benchmarks.recover.BASELINES`), same method and "
            "questions, the gaps summed; questions resampled with all their pairs' gaps.", "",
            "| method | KD presets | GSM8K | OOD | both |", "|---|---|---|---|---|", *lines, ""]


def recover_seeds_section(rows: list[dict]) -> list[str]:
    """The pairs of `questions_section` (`_question_pairs`) measured under several seeds (`recover.SEEDED`), summed
    over the seeds: one recovery run is one draw of adapters, calibration sample and data order, so a gap is read
    from all the draws."""
    pooled: dict[tuple, dict[tuple[str, int], list[int]]] = defaultdict(lambda: defaultdict(list))
    solved: dict[tuple, list[str]] = defaultdict(list)
    tasks = ("gsm8k", "ood")
    for r, other in _question_pairs(rows):
        (preset, seed), (other_preset, _) = preset_seed(r["preset"]), preset_seed(other["preset"])
        comparison = (_pair_label(dict(r, preset=preset), dict(other, preset=other_preset)), len(r["gsm8k"]["correct"]))
        solved[comparison].append(f"{seed}: " + ", ".join(f"{sum(r[t]['correct'])} vs {sum(other[t]['correct'])}" for t in tasks))
        _add_question_gaps(pooled[comparison], r, other)
    lines = []
    for comparison in (c for c in pooled if len(solved[c]) > 1):
        # The allocation was chosen on the first PICKED_ON questions of each set; the rest are an unfitted check.
        fresh = {k: v for k, v in pooled[comparison].items() if k[1] >= PICKED_ON}
        unfitted = [_summed_gap({k: v for k, v in fresh.items() if k[0] == "gsm8k"}), _summed_gap(fresh)] if fresh else ["—", "—"]
        lines.append(f"| {comparison[0]} | {comparison[1]} | {'; '.join(sorted(solved[comparison]))} | "
                     + " | ".join([*_task_gap_cells(pooled[comparison]), *unfitted]) + " |")
    # The same method and preset under two seeds: how far one run's draw alone moves the answers.
    drift = [
        f"| {r['method']} (`{base}`) | seed {seed} − seed 0 | "
        + " | ".join(_count_gap(r[t]["correct"], first[t]["correct"]) for t in tasks)
        + f" | {_count_gap(_both(r), _both(first))} |"
        for r in rows for base, seed in [preset_seed(r["preset"])] if seed
        for first in rows if first["preset"] == base and first["method"] == r["method"] and _same_questions(r, first)
    ]
    if not lines and not drift:
        return []
    out = ["## Prune-and-recover over seeds", "",
           "Runs repeated under another seed (`<preset>-seed<S>`, `benchmarks.recover.SEEDED`: the adapters' "
           "initialisation, the calibration sample and the recovery data's order change, the questions do not).", ""]
    if lines:
        out += ["The pairs above measured under more than one seed, summed over the seeds; questions resampled with all "
                f"their seeds' gaps. *per seed*: solved GSM8K vs solved, OOD vs solved. {UNFITTED}", "",
                f"| pair | questions per task | per seed | GSM8K | OOD | both | GSM8K, from question {PICKED_ON} on | "
                f"both, from question {PICKED_ON} on |", "|---|---|---|---|---|---|---|---|", *lines, ""]
    if drift:
        out += ["The same method and preset under two seeds (a gap between methods smaller than these is within one "
                "run's draw):", "", "| run | seeds | GSM8K | OOD | both |", "|---|---|---|---|---|", *drift, ""]
    return out


def _steps_right(answers: AnswerSet) -> str:
    """Share of the written steps computed right, resampling whole answers (an answer's steps are not independent)."""
    total = sum(answers.steps)
    if total < 20:
        return f"— ({total} steps)"
    low, high = _bootstrap(len(answers.steps), lambda idx: sum(answers.steps_right[i] for i in idx) / max(1, sum(answers.steps[i] for i in idx)))
    return f"{sum(answers.steps_right) / total:.0%} [{low:.0%}, {high:.0%}]"


def answers_section(sets: list[AnswerSet]) -> list[str]:
    """Per answer set: answers cut at the cap, accuracy on the finished ones, and the arithmetic of the written steps."""
    if not sets:
        return []
    out = [
        "## Why the answers are wrong",
        "",
        "Every kept generation of the rows above (greedy). *cut*: the answer used the whole token budget (`cap`), so it "
        "was scored wrong whatever its reasoning; *right of finished*: accuracy on the answers that ended within the "
        "cap; *steps right*: the written binary steps `a op b = c` (`rku_lightning.evaluation.arithmetic`: plain, "
        "GSM8K `<<…>>` and LaTeX forms; steps inside longer expressions are skipped) whose result is right to the "
        "precision written, resampling whole answers. A model whose steps stay right but whose answers are wrong "
        "lost the plan; one whose steps go wrong lost the arithmetic. Brackets: 95 % bootstrap over questions.",
        "",
        "| answers | set | sparsity | cap | right | cut | right of finished | steps / answer | steps right |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in sets:
        finished = [c for c, cut in zip(a.correct, a.cut) if not cut]
        out.append(
            f"| {a.label} | {a.task} | {a.sparsity:.0%} | {a.cap} | {_acc(a.correct, True)} | {_acc(a.cut, True)} | {_acc(finished, True)} "
            f"| {sum(a.steps) / len(a.steps):.1f} | {_steps_right(a)} |"
        )
    return out + [""]


def render() -> Path:
    rows = oneshot_rows()
    lines = ["# Benchmark results", "", "Generated by `python -m benchmarks.run render` from `benchmarks/results/`; "
             "every number below is read from a row JSON there (with its command, commit, data hashes and timings).", ""]
    if rows:
        lines += ["## One-shot quality", ""] + oneshot_tables(rows)
        # Curves use each model's main calibration size; other sizes are investigation rows in the tables.
        models = sorted({r["row"]["model"] for r in rows})
        main = {m: _main_calibration(rows, m) for m in models}
        curves = [plot_sparsity_curves(main[m], m, RESULTS / f"oneshot_sparsity_{m}.png") for m in models]
        profile = plot_layer_profile([r for m in models for r in main[m]], RESULTS / "oneshot_layer_profile.png")
        figures = [("accuracy and CoT NLL vs sparsity", c) for c in curves] + [("kept fraction per layer", profile)]
        lines += [f"![{alt}](results/{p.name})" for alt, p in figures if p]
        lines.append("")
        lines += calibration_section(rows)
        lines += calibration_source_section(rows)
        lines += calibration_source_accuracy_section(rows)
        lines += seed_pooled_section(rows)
    for row in load_rows("diagnostics"):
        lines += diagnostics_section(row)
    if peer := peer_rows():
        lines += peer_section(peer, rows)
    if recover := load_rows("recover"):
        lines += recover_section(recover, RESULTS / "recover_rounds.png")
        lines += recover_layers_section(recover, RESULTS / "recover_layers.png")
    if capped := [row for folder in sorted(RESULTS.glob("recover_t*")) for row in load_rows(folder.name)]:
        lines += cap_section(capped)
    if more := [row for folder in sorted(RESULTS.glob("recover_q*")) for row in load_rows(folder.name)]:
        lines += questions_section(more, rows)
        lines += recover_seeds_section(more)
        lines += recovery_loss_section(more)
    if drift := load_rows("recover_kl"):
        lines += recover_kl_section(drift)
    if efficiency := load_rows("efficiency"):
        lines += efficiency_section(efficiency)
    if llama_cpp := load_rows("llama_cpp"):
        lines += llama_cpp_section(llama_cpp)
    lines += answers_section(answer_sets())
    RESULTS_MD.write_text("\n".join(lines) + "\n")
    return RESULTS_MD
