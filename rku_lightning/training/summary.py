"""The end-of-run summary of the main job: what was removed, what was kept, how much faster, where things are.

Built from the records `RKUPruning` writes to report.json (round 0 is the dense model) and a side-by-side
decode measurement (`evaluation.speed.compare_decode`); printed by `train.py` and saved beside the
report as summary.json / summary.txt, so a person reads the outcome in seconds and a script can too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rku_lightning.files import write_text_atomic

SUMMARY_FILES = ("summary.json", "summary.txt")


def summarize(
    records: Sequence[dict],
    set_sizes: dict[str, tuple[str, int]],
    speed: dict | None,
    seconds: float,
    export_dir: str | None,
    report_dir: str | None,
    reached_target: bool = True,
    allocation: str | None = None,
    traces: Sequence[dict] = (),
) -> dict:
    """The numbers of the summary. `set_sizes`: {accuracy metric: (data-set name, questions)}; `traces`: the data
    module's dense-trace lookups (`ReasoningDataModule.trace_records`), since how many of the traces a run learns
    from are right, or unfinished, bounds what it can learn."""
    rounds = sorted(records, key=lambda r: r["round"])
    if not rounds or rounds[-1]["round"] == 0:
        raise ValueError("summarize: no pruned round in the records (the run pruned nothing)")
    dense = rounds[0] if rounds[0]["round"] == 0 else None
    final = rounds[-1]
    accuracy = {}
    for metric, (name, size) in set_sizes.items():
        pruned = final.get("metrics", {}).get(metric)
        before = dense.get("metrics", {}).get(metric) if dense else None
        if pruned is not None:
            # Answers cut at the token cap count as wrong: the summary says how many there were.
            cut = metric.replace("_acc", "_truncated")
            cut_dense = dense.get("metrics", {}).get(cut) if dense else None
            accuracy[name] = {"questions": size, "dense": _count(before, size), "pruned": _count(pruned, size),
                              "cut": _count(final["metrics"].get(cut), size), "cut_dense": _count(cut_dense, size)}
    speeds = None
    if speed is not None:
        # Each repetition times both models back to back: its ratio is the pair's, free of drift between pairs.
        pairs = [p / d for d, p in zip(speed["dense"]["runs"], speed["pruned"]["runs"])]
        speeds = {"dense_tokens_per_s": speed["dense"]["median"], "pruned_tokens_per_s": speed["pruned"]["median"],
                  "speedup": speed["pruned"]["median"] / speed["dense"]["median"], "pair_speedups": pairs, "settings": speed["settings"]}
    return {
        "rounds": final["round"],
        "reached_target": reached_target,
        "sparsity": final["sparsity"],
        # Sizes known without evaluating the dense model; `get`: records of checkpoints written before they were kept.
        "params": {"dense": final.get("dense_params"), "pruned": final["params"]},
        "kv_cache_bytes_per_token": {"dense": final.get("dense_kv_cache_bytes_per_token"),
                                     "pruned": final["kv_cache_bytes_per_token"]},
        "accuracy": accuracy,
        "kl_to_dense": {r["round"]: r["metrics"]["val/kl_to_dense"] for r in rounds if "val/kl_to_dense" in r.get("metrics", {})},
        "decode": speeds,
        "seconds": seconds,
        "export_dir": export_dir,
        "report_dir": report_dir,
        "allocation": allocation,
        "traces": [dict(t) for t in traces],
    }


def _count(rate: float | None, size: int) -> int | None:
    return None if rate is None or rate != rate else round(rate * size)  # NaN: not measured


def _millions(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f}M"


def format_summary(summary: dict) -> str:
    """About ten lines a person reads in five seconds."""
    params, kv = summary["params"], summary["kv_cache_bytes_per_token"]
    minutes, seconds = divmod(round(summary["seconds"]), 60)
    status = "" if summary["reached_target"] else " (stopped early: short of the target)"
    rounds = summary["rounds"]
    lines = [f"Pruned in {rounds} round{'s' if rounds != 1 else ''}, {minutes} min {seconds:02d} s{status}."]
    lines.append(
        f"  removed  {summary['sparsity']:.0%} of the decoder: {_millions(params['dense'])} -> {_millions(params['pruned'])} "
        f"parameters, KV cache {kv['dense'] or '?'} -> {kv['pruned']} bytes/token"
    )
    for name, acc in summary["accuracy"].items():
        dense = "?" if acc["dense"] is None else acc["dense"]
        cut = "" if acc.get("cut") is None else (
            f"; {acc['cut']} cut at the token cap (dense {'?' if acc['cut_dense'] is None else acc['cut_dense']})")
        lines.append(f"  kept     {name}: {acc['pruned']}/{acc['questions']} correct (dense {dense}/{acc['questions']}){cut}")
    if summary["kl_to_dense"]:
        last = max(summary["kl_to_dense"])
        lines.append(f"           KL to the dense model {summary['kl_to_dense'][last]:.3f} nats/token on its own answers")
    for t in summary["traces"]:
        lines.append(f"  traces   {t['for']}: {t['traces']} dense traces, {t['correct']} right, {t['stopped']} stopped at the "
                     f"token cap ({'cached' if t['hit'] else 'generated'})")
    if summary["decode"] is not None:
        d = summary["decode"]
        lines.append(
            f"  faster   decode {d['pruned_tokens_per_s']:.1f} tokens/s vs dense {d['dense_tokens_per_s']:.1f}: "
            f"{d['speedup']:.2f}x (batch 1, medians; {len(d['pair_speedups'])} interleaved pairs "
            f"{min(d['pair_speedups']):.2f}-{max(d['pair_speedups']):.2f}x)"
        )
    if summary["export_dir"]:
        export = summary["export_dir"]
        lines += [
            f"  export   {export}",
            f"           transformers: rku_lightning.load_pruned({export!r})"
            + ("" if summary.get("allocation") != "uniform" else f" or AutoModelForCausalLM.from_pretrained({export!r})"),
            f"           llama.cpp: rku_lightning.save_pruned(*rku_lightning.load_pruned({export!r}), 'model.gguf', format='gguf')",
        ]
    if summary["report_dir"]:
        lines.append(f"  report   {Path(summary['report_dir']) / 'report.md'} (plots: sparsity_curve.png, layer_profile.png)")
    return "\n".join(lines)


def write_summary(summary: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {name: out / name for name in SUMMARY_FILES}
    write_text_atomic(paths["summary.json"], json.dumps(summary, indent=2))
    write_text_atomic(paths["summary.txt"], format_summary(summary) + "\n")
    return paths
