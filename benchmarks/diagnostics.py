"""Why methods differ: where each one prunes, and how much their choices overlap.

    python -m benchmarks.diagnostics --model qwen0.5b --sparsity 0.4

Uses the one-shot stage's cached calibration statistics (no generation, about a minute on CPU):
for every method, the plan at `--sparsity` (global allocation) is made on a fresh copy of the dense
model; the row records the per-layer block Fisher traces T_l that RKU divides by, the kept fraction
per layer, and the Jaccard overlap of the removed MLP channels between every pair of methods.
"""

from __future__ import annotations

import argparse
import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from rku_lightning import StructuredPruner, load_causal_lm  # noqa: E402

from .common import MODELS, RESULTS, write_row  # noqa: E402
from .oneshot import Settings, _stats_path  # noqa: E402

METHODS = ("rku", "kinetic", "taylor", "magnitude", "wanda_sp", "flap", "random")


def removed_channels(pruner: StructuredPruner) -> set[tuple[int, int]]:
    return {(i, int(j)) for i, mask in enumerate(pruner.gates.mlp) for j in torch.nonzero(mask == 0).flatten()}


def diagnose(model_key: str, sparsity: float, settings: Settings) -> dict:
    stats = torch.load(_stats_path(model_key, "ce", settings))
    plans: dict[str, dict] = {}
    removed: dict[str, set] = {}
    traces: dict[str, list[float]] = {}
    for method in METHODS:
        model, _ = load_causal_lm(MODELS[model_key])
        pruner = StructuredPruner(model, importance=method, seed=settings.seed, progress=False)
        pruner.stats.load_state_dict(stats)
        report = pruner.prune(sparsity)
        plans[method] = {
            "mlp_kept": [r.mlp_channels / r.mlp_channels_total for r in report.layers],
            "groups_kept": [r.kv_groups / r.kv_groups_total for r in report.layers],
        }
        removed[method] = removed_channels(pruner)
        if method == "rku":
            layers = range(len(report.layers))
            traces = {
                kind: [float(pruner.stats.gradients(kind, i).sq_mean.mean()) for i in layers] for kind in ("mlp", "group")
            }
    overlap = {
        f"{a}|{b}": len(removed[a] & removed[b]) / max(1, len(removed[a] | removed[b]))
        for a, b in itertools.combinations(METHODS, 2)
    }
    return {"sparsity": sparsity, "fisher_trace": traces, "plans": plans, "removed_mlp_jaccard": overlap}


def plot(record: dict, path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for kind, values in record["fisher_trace"].items():
        axes[0].semilogy(values, marker="o", label=f"T_l ({kind})")
    axes[0].set_title("block Fisher trace T_l (RKU's divisor)")
    for method, plan in record["plans"].items():
        width = 2.5 if method == "rku" else 1.2
        axes[1].plot(plan["mlp_kept"], marker=".", linewidth=width, label=method)
        axes[2].plot(plan["groups_kept"], marker=".", linewidth=width, label=method)
    axes[1].set_title(f"MLP channels kept ({record['sparsity']:.0%} global)")
    axes[2].set_title("attention groups kept")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnostics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen0.5b", choices=sorted(MODELS))
    parser.add_argument("--sparsity", type=float, default=0.4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    record = diagnose(args.model, args.sparsity, Settings())
    row_id = f"{args.model}-{round(args.sparsity * 100)}"
    plot(record, RESULTS / f"diagnostics_{row_id}.png")
    write_row("diagnostics", row_id, record)
    pairs = sorted(record["removed_mlp_jaccard"].items(), key=lambda kv: -kv[1])
    print("\n".join(f"{pair:22s} {value:.2f}" for pair, value in pairs))


if __name__ == "__main__":
    main()
