"""Peer rows: Torch-Pruning (its public API) prunes the same model to the engine's parameter count.

``python -m benchmarks.peer --model qwen0.5b --sparsity 0.4 --importance magnitude|taylor`` loads the
dense model, asks our engine how many decoder parameters its `sparsity` leaves, prunes to that count
with Torch-Pruning's `BasePruner` and `GroupMagnitudeImportance` / `GroupTaylorImportance`, repairs the
Hugging Face attributes that the new shapes invalidate, and evaluates with our `evaluate_model`.

What Torch-Pruning can and cannot do here (see docs/benchmark-peer-efficiency.md):

* MLP channels go through Torch-Pruning end to end: its dependency graph builds the
  gate/up-out + down-in group, its importance scores it, `BasePruner.step` picks and removes the
  channels with one ratio per layer (`global_pruning=False`, as in its LLM example).
* Attention: Torch-Pruning's dependency graph never finishes building the group of a `q_proj` or
  `k_proj` root on Llama/Qwen2 attention in transformers 5 (sdpa and eager alike; upstream issue
  VainF/Torch-Pruning#527), so `BasePruner` cannot be given the attention projections. Query heads
  are therefore scored with the same Torch-Pruning importance object on a `tp.Group` holding the
  head's `q_proj` rows and `o_proj` columns (the group its head pruning would use; KV projections are
  never pruned by its GQA path), the same number of query heads is removed from every KV group
  (its local GQA rule), and the cut is made with `tp.prune_linear_out_channels` / `_in_channels`.
* The hidden size (residual stream) is not pruned, as in the engine: `o_proj`, `down_proj` and
  `lm_head` are ignored as roots so Torch-Pruning never forms the hidden-dimension group.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings

import torch
from torch import nn

from rku_lightning import StructuredPruner, load_causal_lm
from rku_lightning.evaluation.calibration import calibration_batches
from rku_lightning.evaluation.data import load_problems
from rku_lightning.evaluation.evaluate import evaluate_model, nll_columns
from rku_lightning.files import sha256_file

from .common import DATA, MODELS, is_done, write_row

STAGE = "peer"
#: NLL-only rows (`--no-generate`): per-question CoT NLL in minutes, paired with the one-shot rows.
NLL_STAGE = "peer_nll"
IMPORTANCES = ("magnitude", "taylor")
#: Why the attention projections cannot be handed to BasePruner (reproduced in tests on a tiny model).
ATTENTION_LIMITATION = (
    "torch_pruning DependencyGraph.get_pruning_group never returns for a q_proj or k_proj root "
    "(_fix_dependency_graph_non_recursive keeps growing its stack; the index mappings through RoPE and the "
    "attention products apparently never settle) on Llama/Qwen2 in transformers 5, sdpa and eager attention, "
    "with or without GQA (cf. VainF/Torch-Pruning#527); "
    "BasePruner.__init__ enumerates every root group, so it hangs unless q/k/v/o_proj are ignored layers"
)


def tp_version() -> str:
    from importlib.metadata import version

    return version("torch-pruning")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def decoder_params(model: nn.Module) -> int:
    return sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())


def engine_target(model: nn.Module, sparsity: float) -> dict:
    """The decoder parameter count our engine leaves at `sparsity` (global allocation, KV groups).

    Counted on a copy with the magnitude importance: the count depends on the fill of the parameter
    budget, not on which structures the scores choose (any importance lands within one step of it).
    """
    clone = copy.deepcopy(model)
    report = StructuredPruner(clone, importance="magnitude", allocation="global", attention="groups", progress=False).prune(sparsity)
    del clone
    return {
        "decoder_params_before": report.decoder_params_before,
        "decoder_params_after": report.decoder_params_after,
        "sparsity": report.sparsity,
        "kv_cache_bytes_per_token_after": report.kv_cache_bytes_per_token_after,
        "counted_with": "StructuredPruner(importance='magnitude', allocation='global', attention='groups', min_mlp_keep=0.1).prune",
    }


def make_importance(name: str):
    import torch_pruning as tp

    if name == "magnitude":  # as in Torch-Pruning's examples/LLMs/prune_llm.py
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean", multivariable=False)
    raise ValueError(f"importance must be one of {IMPORTANCES}, got {name!r}")


def prunable_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights Torch-Pruning's Taylor importance reads gradients of: decoder q/o and MLP projections."""
    weights = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        weights += [attn.q_proj.weight, attn.o_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    return weights


def taylor_gradients(model: nn.Module, batches: list[dict]) -> dict:
    """Accumulate weight gradients (sum over batches of the mean CE loss) for GroupTaylorImportance."""
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    weights = prunable_weights(model)
    for w in weights:
        w.requires_grad_(True)
    tokens = 0
    started = time.perf_counter()
    with torch.enable_grad():
        for batch in batches:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            out.loss.backward()
            tokens += int((batch["labels"] != -100).sum())
    return {"backward_s": round(time.perf_counter() - started, 2), "batches": len(batches), "label_tokens": tokens}


def build_pruner(model: nn.Module, importance, example_input: torch.Tensor, mlp_ratio: float):
    """Torch-Pruning's BasePruner over the MLP groups only (attention projections and lm_head ignored)."""
    import torch_pruning as tp

    ignored: list[nn.Module] = [model.lm_head]
    for layer in decoder_layers(model):
        attn = layer.self_attn
        ignored += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.down_proj]
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # tracing reads grad_fn, which needs parameters that require grad
        p.requires_grad_(True)
    try:
        with warnings.catch_warnings():
            # Norm weights are unwrapped parameters it would cut on the hidden dimension, which no group here prunes.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            pruner = tp.pruner.BasePruner(
                model,
                example_inputs=example_input,
                importance=importance,
                global_pruning=False,
                pruning_ratio=mlp_ratio,
                ignored_layers=ignored,
                output_transform=lambda out: out.logits,
            )
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
    return pruner


def head_importance(pruner, importance, layer: nn.Module, num_heads: int) -> torch.Tensor:
    """Per-query-head score from `importance` on the group [q_proj out rows, o_proj in columns]."""
    import torch_pruning as tp

    attn = layer.self_attn
    dims = attn.q_proj.out_features
    group = tp.Group()
    for module, fn in ((attn.q_proj, tp.prune_linear_out_channels), (attn.o_proj, tp.prune_linear_in_channels)):
        node = pruner.DG.module2node[module]
        group.add_dep(tp.Dependency(fn, fn, source=node, target=node), list(range(dims)))
        group[len(group) - 1].root_idxs = list(range(dims))
    group._DG = pruner.DG
    scores = importance(group)
    return scores.view(num_heads, -1).mean(1).float().cpu()  # per-head mean, as BasePruner does


def gqa_heads_to_remove(scores: torch.Tensor, num_kv: int, per_group: int) -> list[int]:
    """The `per_group` lowest-scored query heads of every KV group (Torch-Pruning's local GQA rule)."""
    size = scores.numel() // num_kv
    removed = []
    for g in range(num_kv):
        local = scores[g * size : (g + 1) * size]
        removed += [g * size + int(i) for i in torch.topk(local, per_group, largest=False).indices]
    return sorted(removed)


def plan_counts(model: nn.Module, target_decoder_params: int, head_ratio: float) -> dict:
    """Query heads per KV group and MLP channels per layer to remove so the decoder lands on the target."""
    cfg = model.config
    layers = decoder_layers(model)
    attn = layers[0].self_attn
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = attn.q_proj.out_features // heads
    hidden = attn.q_proj.in_features
    inter = layers[0].mlp.gate_proj.out_features
    per_group = min(math.ceil(math.ceil(head_ratio * heads) / kv), heads // kv - 1) if head_ratio > 0 else 0
    head_cost = 2 * head_dim * hidden + (head_dim if attn.q_proj.bias is not None else 0)
    mlp = layers[0].mlp
    channel_cost = sum(p[0].numel() for p in (mlp.gate_proj.weight, mlp.up_proj.weight)) + mlp.down_proj.weight[:, 0].numel()
    to_remove = decoder_params(model) - target_decoder_params
    channels = round((to_remove - len(layers) * per_group * kv * head_cost) / (len(layers) * channel_cost))
    if not 0 <= channels < inter:
        raise ValueError(f"target {target_decoder_params} is unreachable with {per_group} heads per KV group removed")
    return {"heads_removed_per_kv_group": per_group, "heads_removed_per_layer": per_group * kv, "heads_before": heads,
            "kv_heads": kv, "head_dim": head_dim, "mlp_channels_removed_per_layer": channels, "mlp_channels_before": inter}


def fix_hf_attributes(model: nn.Module, heads: int, head_dim: int, intermediate: int) -> None:
    """Make config and attention modules agree with the new (uniform) shapes so `generate` works."""
    cfg = model.config
    cfg.head_dim = head_dim  # otherwise derived from hidden_size // num_attention_heads
    cfg.num_attention_heads = heads
    cfg.intermediate_size = intermediate
    for layer in decoder_layers(model):
        attn = layer.self_attn
        attn.num_key_value_groups = heads // cfg.num_key_value_heads
        attn.head_dim = head_dim
        if hasattr(attn, "num_heads"):
            attn.num_heads = heads
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = intermediate


def prune_with_torch_pruning(
    model: nn.Module,
    importance_name: str,
    target_decoder_params: int,
    example_input: torch.Tensor,
    batches: list[dict] | None = None,
    head_ratio: float = 0.4,
) -> dict:
    """Prune `model` in place with Torch-Pruning to about `target_decoder_params`; returns what was done."""
    import torch_pruning as tp

    timings: dict = {}
    counts = plan_counts(model, target_decoder_params, head_ratio)
    importance = make_importance(importance_name)
    if importance_name == "taylor":
        if not batches:
            raise ValueError("taylor importance needs calibration batches (weight gradients)")
        timings.update(taylor_gradients(model, batches))
    started = time.perf_counter()
    inter = counts["mlp_channels_before"]
    # BasePruner removes `I - int(I * (1 - ratio))` channels per layer: aim half a channel low.
    ratio = (counts["mlp_channels_removed_per_layer"] - 0.5) / inter if counts["mlp_channels_removed_per_layer"] else 0.0
    pruner = build_pruner(model, importance, example_input, ratio)
    timings["trace_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    heads, kv, per_group = counts["heads_before"], counts["kv_heads"], counts["heads_removed_per_kv_group"]
    removed_heads = []
    for layer in decoder_layers(model):
        scores = head_importance(pruner, importance, layer, heads)
        removed_heads.append(gqa_heads_to_remove(scores, kv, per_group) if per_group else [])
    if ratio > 0:
        pruner.step()
    hd = counts["head_dim"]
    for layer, remove in zip(decoder_layers(model), removed_heads):
        if remove:
            dims = [h * hd + j for h in remove for j in range(hd)]
            tp.prune_linear_out_channels(layer.self_attn.q_proj, dims)
            tp.prune_linear_in_channels(layer.self_attn.o_proj, dims)
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    kept_heads = heads - per_group * kv
    kept_channels = decoder_layers(model)[0].mlp.gate_proj.out_features
    fix_hf_attributes(model, kept_heads, hd, kept_channels)
    timings["prune_s"] = round(time.perf_counter() - started, 2)
    achieved = decoder_params(model)
    return {
        "torch_pruning_version": tp_version(),
        "importance": importance_name,
        "importance_config": repr(vars(importance)),
        "counts": counts,
        "mlp_pruning_ratio_passed": ratio,
        "head_ratio": head_ratio,
        "removed_query_heads": removed_heads,
        "kept_query_heads_per_layer": kept_heads,
        "kept_mlp_channels_per_layer": [layer.mlp.gate_proj.out_features for layer in decoder_layers(model)],
        "target_decoder_params": target_decoder_params,
        "achieved_decoder_params": achieved,
        "relative_gap": (achieved - target_decoder_params) / target_decoder_params,
        "total_params_after": sum(p.numel() for p in model.parameters()),
        "kv_cache_bytes_per_token_after": 2 * kv * hd * len(decoder_layers(model)) * next(model.parameters()).element_size(),
        "timings": timings,
    }


DIFFERENCES = [
    "allocation: Torch-Pruning uses one ratio per layer (global_pruning=False, its LLM example); the engine ranks globally",
    "attention unit: Torch-Pruning removes query heads, the same number from each KV group, and never prunes "
    "k_proj/v_proj under GQA (KV cache unchanged); the engine (attention='groups') removes whole KV groups with "
    "their query heads (KV cache shrinks)",
    "head count: Torch-Pruning's rule ceil(ceil(ratio*heads)/kv_heads) per KV group with head ratio = the sparsity "
    "(its example sets head_pruning_ratio = pruning_ratio) or, in rows whose id ends in -hNN, NN %; the MLP ratio is then solved so that the decoder "
    "parameter count matches the engine's (uniform per layer, so it lands within half a channel per layer)",
    "attention scoring path: " + ATTENTION_LIMITATION + "; query heads are therefore scored by the same importance "
    "object on a manually assembled tp.Group [q_proj out rows, o_proj in columns] and cut with "
    "tp.prune_linear_out_channels / tp.prune_linear_in_channels; MLP channels go through BasePruner.step",
    "hidden size is not pruned by either (o_proj, down_proj, lm_head are ignored roots)",
    "no min_mlp_keep floor needed (uniform ratio); no round_to (the engine does not round either)",
    "taylor: first-order |w * dL/dw| summed over each channel's weights, gradients of the mean CE over the label "
    "tokens of the same calibration batches the engine's RKU uses, accumulated over batches",
]


def run_row(model_key: str, sparsity: float, importance: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    timings: dict = {}
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(MODELS[model_key])
    timings["load_s"] = round(time.perf_counter() - started, 1)
    target = engine_target(model, sparsity)
    train = DATA / "gsm8k" / "train.jsonl"
    batches = None
    if importance == "taylor":
        problems = load_problems(train, task="gsm8k", split="train")
        batches = calibration_batches(tokenizer, problems, args.calib_samples, 4, args.calib_max_length, seed=args.seed)
    example = torch.tensor([tokenizer.encode("Hello world.")])
    head_ratio = sparsity if args.head_ratio is None else args.head_ratio
    info = prune_with_torch_pruning(model, importance, target["decoder_params_after"], example, batches, head_ratio=head_ratio)
    model.eval()
    gsm8k_path, svamp_path = DATA / "gsm8k" / "test.jsonl", DATA / "svamp" / "test.jsonl"
    gsm8k = load_problems(gsm8k_path, task="gsm8k", limit=args.limit)
    svamp = load_problems(svamp_path, task="svamp", limit=args.svamp_limit)
    started = time.perf_counter()
    # Scored like the one-shot rows (pairs of sequences, no plain-text pass) so their NLL columns pair up.
    g = evaluate_model(
        model, tokenizer, gsm8k, args.batch_size, args.max_new_tokens, generate=args.generate, nll_batch_size=2, perplexity=False
    )
    timings["gsm8k_s"] = round(time.perf_counter() - started, 1)
    s: dict = {"metrics": {}, "predictions": []}
    if args.generate:
        started = time.perf_counter()
        s = evaluate_model(model, tokenizer, svamp, args.batch_size, args.max_new_tokens, nll=False)
        timings["svamp_s"] = round(time.perf_counter() - started, 1)
    data = {
        "gsm8k_test": {"path": str(gsm8k_path), "sha256": sha256_file(gsm8k_path)},
        "svamp_test": {"path": str(svamp_path), "sha256": sha256_file(svamp_path)},
    }
    if batches:
        data["gsm8k_train"] = {"path": str(train), "sha256": sha256_file(train)}
    return {
        "model": model_key,
        "model_source": MODELS[model_key],
        "sparsity": sparsity,
        "settings": {k: getattr(args, k) for k in ("limit", "svamp_limit", "max_new_tokens", "batch_size", "calib_samples", "calib_max_length", "seed", "generate", "head_ratio")},
        "engine_target": target,
        "torch_pruning": info,
        "achieved_sparsity": 1 - info["achieved_decoder_params"] / target["decoder_params_before"],
        "params": sum(p.numel() for p in model.parameters()),
        "differences_from_engine": DIFFERENCES,
        "gsm8k": g["metrics"],
        "svamp": s["metrics"],
        "gsm8k_correct": [p["correct"] for p in g["predictions"]] if args.generate else [],
        "svamp_correct": [p["correct"] for p in s["predictions"]],
        "gsm8k_nll": nll_columns(g["predictions"]),
        "gsm8k_indices": [p.index for p in gsm8k],
        "data": data,
        "timings": {**timings, **info["timings"]},
        "predictions": {"gsm8k": g["predictions"], "svamp": s["predictions"]},
    }


def row_id(model_key: str, importance: str, sparsity: float, head_ratio: float | None = None) -> str:
    """`qwen0.5b-tp_taylor-40`; with a head ratio other than the sparsity, `...-40-h33`."""
    rid = f"{model_key}-tp_{importance}-{int(round(sparsity * 100))}"
    return rid if head_ratio is None or head_ratio == sparsity else f"{rid}-h{int(round(head_ratio * 100))}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description="Torch-Pruning peer row.")
    parser.add_argument("--model", default="qwen0.5b", choices=sorted(MODELS))
    parser.add_argument("--sparsity", type=float, default=0.4)
    parser.add_argument("--importance", default="magnitude", choices=IMPORTANCES)
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--svamp-limit", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-ratio", type=float, default=None,
                        help="Torch-Pruning's head_pruning_ratio (default: the sparsity, as its LLM example); e.g. 0.33 "
                        "removes one query head per KV group on SmolLM2, the engine's uniform choice there")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-generate: CoT NLL only (minutes instead of most of an hour on 2 CPU cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.head_ratio is not None and not 0 <= args.head_ratio < 1:
        parser.error(f"--head-ratio must be in [0, 1), got {args.head_ratio}")
    rid = row_id(args.model, args.importance, args.sparsity, args.head_ratio)
    stage = STAGE if args.generate else NLL_STAGE
    if is_done(stage, rid):
        print(f"{rid}: done already")
        return
    record = run_row(args.model, args.sparsity, args.importance, args)
    predictions = record.pop("predictions")
    path = write_row(stage, rid, record)
    lines = [json.dumps({"set": name, **p}) for name, rows in predictions.items() for p in rows]
    path.with_suffix(".predictions.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{rid}: params {record['torch_pruning']['achieved_decoder_params']} (target {record['engine_target']['decoder_params_after']}) "
          f"GSM8K {record['gsm8k'].get('accuracy')} SVAMP {record['svamp'].get('accuracy')} -> {path}")


if __name__ == "__main__":
    main()
