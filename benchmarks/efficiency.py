"""Efficiency rows: what the pruned model saves at inference, and what RKU scoring costs.

``python -m benchmarks.efficiency --model qwen0.5b --sparsity 0.4`` writes two rows:

* ``efficiency/{model}-{pct}``: the dense model and the engine's `pct`% pruned, compacted model
  (RKU, CE objective, global allocation, KV groups; the one-shot stage's calibration statistics, i.e.
  the same model as row ``oneshot/{model}-rku-global-{pct}``), both held in this process and measured
  alternately (interleaved repetitions, medians): greedy decode tokens/s at batch 1 and batch 16
  (fixed prompt, `min_new_tokens` = `max_new_tokens`), prefill tokens/s, KV-cache bytes per token
  (report, and measured from a real cache). Peak memory of generation is measured in a child process
  per model (the pruned one loaded from a `save_pruned` export) because RSS peaks are per process.
  Every ratio is pruned / dense; `ideal_ratio` = dense / pruned parameter count is the speed-up a
  purely parameter-bound computation would get.
* ``efficiency/{model}-scoring-memory``: RKU scoring (`StructuredPruner.calibrate`: gradients of the
  per-structure gates only, base weights frozen) vs weight-gradient Taylor scoring (Torch-Pruning's
  `GroupTaylorImportance`: `loss.backward()` into the decoder weights, then the importance of every
  group) on the same calibration batches, each in its own child process: wall time and peak RSS.

On a GPU the memory numbers are `torch.cuda.max_memory_allocated`; on CPU they are the process's
peak resident set size (VmHWM), reset with /proc/self/clear_refs once the model is loaded, so the
peak covers the model weights plus what the measured work allocates.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from rku_lightning import StructuredPruner, compact, load_causal_lm, load_pruned, save_pruned
from rku_lightning.evaluation.calibration import calibration_batches
from rku_lightning.evaluation.data import load_problems
from rku_lightning.evaluation.speed import SPEED_PROMPT as PROMPT
from rku_lightning.evaluation.speed import decode_tokens_per_s, device_of, prefill_tokens_per_s, prompt_ids
from rku_lightning.files import sha256_file
from rku_lightning.memory import memory_snapshot, reset_peak_memory

from .common import DATA, MODELS, WORK, is_done, write_row

STAGE = "efficiency"


def _cache_tensors(cache) -> list[torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56 DynamicCache
        return [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    if hasattr(cache, "key_cache"):
        return list(cache.key_cache) + list(cache.value_cache)
    return [t for pair in cache for t in pair]


@torch.inference_mode()
def measured_kv_bytes_per_token(model, tokenizer, length: int = 16) -> int:
    """Bytes the model's KV cache holds per token, read from the cache of a real forward pass."""
    device = device_of(model)
    inputs = {k: v.to(device) for k, v in prompt_ids(tokenizer, 1, length).items()}
    cache = model(**inputs, use_cache=True).past_key_values
    total = sum(t.numel() * t.element_size() for t in _cache_tensors(cache))
    return total // length


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def compare_models(models: dict, tokenizer, reps: int = 3, new_tokens: int = 32, big_batch: int = 16,
                   prefill_batch: int = 4, prefill_length: int = 256) -> dict:
    """Interleaved repetitions over `models` ({name: model}); medians of each measurement."""
    runs: dict = {name: {"decode_b1": [], f"decode_b{big_batch}": [], "prefill": []} for name in models}
    for model in models.values():  # warm-up (allocator, kernels), not recorded
        decode_tokens_per_s(model, tokenizer, 1, 2)
        prefill_tokens_per_s(model, tokenizer, 1, 8)
    for _ in range(reps):
        for name, model in models.items():
            runs[name]["decode_b1"].append(decode_tokens_per_s(model, tokenizer, 1, new_tokens))
            runs[name][f"decode_b{big_batch}"].append(decode_tokens_per_s(model, tokenizer, big_batch, new_tokens))
            runs[name]["prefill"].append(prefill_tokens_per_s(model, tokenizer, prefill_batch, prefill_length))
    result = {}
    for name, model in models.items():
        result[name] = {
            "params": params(model),
            "kv_cache_bytes_per_token_measured": measured_kv_bytes_per_token(model, tokenizer),
            **{f"{key}_tokens_per_s": round(statistics.median(values), 3) for key, values in runs[name].items()},
            # Other jobs only ever slow a run down: the best repetition is the least disturbed one.
            **{f"{key}_best_tokens_per_s": round(max(values), 3) for key, values in runs[name].items()},
            "runs": {key: [round(v, 3) for v in values] for key, values in runs[name].items()},
        }
    result["settings"] = {"reps": reps, "new_tokens": new_tokens, "big_batch": big_batch, "prefill_batch": prefill_batch,
                          "prefill_length": prefill_length, "prompt": PROMPT, "greedy": True, "interleaved": True}
    return result


def ratios(dense: dict, pruned: dict) -> dict:
    keys = [k for k in dense if k.endswith("_tokens_per_s") or k.startswith("kv_cache") or k.startswith("peak_")]
    out = {k: round(pruned[k] / dense[k], 4) for k in keys if k in pruned and dense.get(k)}
    out["ideal_ratio"] = round(dense["params"] / pruned["params"], 4)
    return out


# -- child processes: clean peak memory ------------------------------------------------------------
def _settle(model) -> None:
    """Make the loaded weights resident and return freed heap to the OS, so the baseline is the model.

    Lazily mmapped checkpoints otherwise fault their weights in during the measured work, and a loader's
    temporary copies can linger in the heap; either would be charged to the wrong side.
    """
    with torch.inference_mode():
        for p in model.parameters():  # read every page: a 1-token forward leaves most of the embedding unread
            p.sum()
        model(input_ids=torch.ones(1, 1, dtype=torch.long, device=device_of(model)))
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load(spec: dict):
    if spec["kind"] == "pruned":
        return load_pruned(spec["path"])
    return load_causal_lm(spec["path"])


def _generation_memory_child(spec: dict, batch: int, new_tokens: int, threads: int, queue) -> None:
    try:
        torch.set_num_threads(threads)
        model, tokenizer = _load(spec)
        if torch.cuda.is_available():
            model.cuda()
        _settle(model)
        reset_peak_memory()
        loaded = memory_snapshot()
        seconds = time.perf_counter()
        rate = decode_tokens_per_s(model, tokenizer, batch, new_tokens)
        seconds = time.perf_counter() - seconds
        peak = memory_snapshot()
        queue.put({"loaded_bytes": loaded["current_bytes"], "peak_bytes": peak["peak_bytes"],
                   "generation_extra_bytes": peak["peak_bytes"] - loaded["current_bytes"], "memory_kind": peak["kind"],
                   "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "batch": batch, "new_tokens": new_tokens,
                   "tokens_per_s": rate, "seconds": seconds})
    except BaseException as error:  # report, not hang the parent
        queue.put({"error": repr(error)})


def _scoring_child(spec: dict, method: str, batches_path: str, threads: int, queue) -> None:
    try:
        torch.set_num_threads(threads)
        model, _ = _load(spec)
        batches = torch.load(batches_path)
        _settle(model)
        reset_peak_memory()
        loaded = memory_snapshot()
        started = time.perf_counter()
        detail: dict = {}
        if method in ("rku", "rku_checkpointed"):
            pruner = StructuredPruner(
                model, importance="rku", objective="ce", progress=False, checkpoint_layers=method == "rku_checkpointed"
            )
            pruner.calibrate(batches)
        elif method == "taylor":
            from . import peer

            detail = peer.taylor_gradients(model, batches)
            grads_done = time.perf_counter()
            detail["group_scores"] = taylor_scores(model, batches[0]["input_ids"][:1, :8])
            detail["importance_s"] = round(time.perf_counter() - grads_done, 2)
        else:
            raise ValueError(method)
        seconds = time.perf_counter() - started
        peak = memory_snapshot()
        queue.put({"method": method, "seconds": round(seconds, 2), "loaded_bytes": loaded["current_bytes"],
                   "peak_bytes": peak["peak_bytes"], "scoring_extra_bytes": peak["peak_bytes"] - loaded["current_bytes"],
                   "memory_kind": peak["kind"], **detail})
    except BaseException as error:
        queue.put({"error": repr(error)})


def taylor_scores(model, example: torch.Tensor) -> int:
    """GroupTaylorImportance of every MLP group (BasePruner) and every query head; returns the count scored."""
    from . import peer

    importance = peer.make_importance("taylor")
    pruner = peer.build_pruner(model, importance, example, 0.0)
    scored = 0
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        scored += int(pruner.estimate_importance(group).numel())
    heads = model.config.num_attention_heads
    for layer in peer.decoder_layers(model):
        scored += int(peer.head_importance(pruner, importance, layer, heads).numel())
    return scored


def in_child(target, *args, timeout: float = 3600) -> dict:
    """Run `target(*args, queue)` in a fresh spawned process; its dict result (or error)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    try:
        result = queue.get(timeout=timeout)
    finally:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    if "error" in result:
        raise RuntimeError(f"child {target.__name__} failed: {result['error']}")
    return result


# -- the rows --------------------------------------------------------------------------------------
def pruned_export(model_key: str, sparsity: float, out_dir: Path) -> dict:
    """Prune with the engine (the one-shot row's RKU model), compact and `save_pruned` it; its report."""
    from .oneshot import Row, Settings, calibrated_pruner

    settings = Settings()
    model, tokenizer = load_causal_lm(MODELS[model_key])
    row = Row(model_key, "rku", "ce", "global", sparsity)
    started = time.perf_counter()
    pruner, timing = calibrated_pruner(row, model, tokenizer, settings)
    report = pruner.prune(sparsity).to_dict()
    compact(model)
    timing["prune_s"] = round(time.perf_counter() - started, 1)
    save_pruned(model, tokenizer, out_dir, overwrite=True, metadata={"benchmark": "efficiency"})
    return {"report": report, "timings": timing, "oneshot_row": row.row_id,
            "calibration": {"samples": settings.calib_samples, "max_length": settings.calib_max_length, "seed": settings.seed}}


def efficiency_row(model_key: str, sparsity: float, args) -> dict:
    out_dir = WORK / "efficiency" / f"{model_key}-rku-global-{round(sparsity * 100)}"
    made = pruned_export(model_key, sparsity, out_dir)
    dense, tokenizer = load_causal_lm(MODELS[model_key])
    pruned, _ = load_pruned(out_dir)
    report = made["report"]
    measured = compare_models({"dense": dense, "pruned": pruned}, tokenizer, reps=args.reps, new_tokens=args.new_tokens,
                              big_batch=args.big_batch, prefill_batch=args.prefill_batch, prefill_length=args.prefill_length)
    del dense, pruned
    gc.collect()
    measured["dense"]["kv_cache_bytes_per_token_report"] = report["kv_cache_bytes_per_token_before"]
    measured["pruned"]["kv_cache_bytes_per_token_report"] = report["kv_cache_bytes_per_token_after"]
    for name, spec in (("dense", {"kind": "source", "path": MODELS[model_key]}), ("pruned", {"kind": "pruned", "path": str(out_dir)})):
        memory = in_child(_generation_memory_child, spec, args.big_batch, args.new_tokens, args.threads)
        measured[name]["generation_memory"] = memory
        measured[name]["peak_generation_bytes"] = memory["peak_bytes"]
        measured[name]["peak_generation_extra_bytes"] = memory["generation_extra_bytes"]
        # Weights plus what generation adds: free of the interpreter/library baseline in the RSS.
        measured[name]["peak_weights_plus_generation_bytes"] = memory["param_bytes"] + memory["generation_extra_bytes"]
    return {
        "model": model_key,
        "model_source": MODELS[model_key],
        "sparsity": sparsity,
        "pruned_model": {"method": "rku, objective ce, allocation global, attention groups, min_mlp_keep 0.1",
                         "export": str(out_dir.relative_to(WORK.parent.parent)), **made},
        "dense": measured["dense"],
        "pruned": measured["pruned"],
        "ratios_pruned_over_dense": ratios(measured["dense"], measured["pruned"]),
        "settings": measured["settings"],
    }


def scoring_row(model_key: str, args) -> dict:
    model, tokenizer = load_causal_lm(MODELS[model_key])
    del model  # only the tokenizer is needed here; each child loads its own copy
    gc.collect()
    train = DATA / "gsm8k" / "train.jsonl"
    problems = load_problems(train, task="gsm8k", split="train")
    batches = calibration_batches(tokenizer, problems, args.scoring_samples, 4, args.calib_max_length, seed=0)
    path = WORK / "efficiency" / f"{model_key}-scoring-batches.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(batches, path)
    spec = {"kind": "source", "path": MODELS[model_key]}
    methods = ("rku", "rku_checkpointed", "taylor")
    results = {method: in_child(_scoring_child, spec, method, str(path), args.threads) for method in methods}
    taylor = results["taylor"]
    return {
        "model": model_key,
        "model_source": MODELS[model_key],
        "batches": len(batches),
        "samples": args.scoring_samples,
        "max_length": args.calib_max_length,
        "label_tokens": int(sum(int((b["labels"] != -100).sum()) for b in batches)),
        "data": {"gsm8k_train": {"path": str(train), "sha256": sha256_file(train)}},
        **results,
        **{f"ratios_{method}_over_taylor": {
            "seconds": round(results[method]["seconds"] / taylor["seconds"], 4),
            "peak_bytes": round(results[method]["peak_bytes"] / taylor["peak_bytes"], 4),
            "scoring_extra_bytes": round(results[method]["scoring_extra_bytes"] / taylor["scoring_extra_bytes"], 4)
            if taylor["scoring_extra_bytes"] > 0 else None,
        } for method in methods[:2]},
        "what": "rku: StructuredPruner.calibrate (gate gradients only, weights frozen; logits of labelled tokens only); "
                "rku_checkpointed: the same with checkpoint_layers=True; taylor: loss.backward() with "
                "gradients of every decoder q/o/gate/up/down weight (embeddings, lm_head, norms, k/v frozen) + "
                "Torch-Pruning GroupTaylorImportance of every MLP group and query head",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.efficiency", description="Efficiency rows.")
    parser.add_argument("--model", default="qwen0.5b", choices=sorted(MODELS))
    parser.add_argument("--sparsity", type=float, default=0.4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--big-batch", type=int, default=16)
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--prefill-length", type=int, default=256)
    parser.add_argument("--scoring-samples", type=int, default=8)
    parser.add_argument("--calib-max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("speed", "scoring"), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # -ckpt: with the checkpointed variant and labelled-token logits (the older rows measured neither).
    speed_id, scoring_id = f"{args.model}-{round(args.sparsity * 100)}", f"{args.model}-scoring-memory-ckpt"
    if args.only != "scoring":
        if is_done(STAGE, speed_id):
            print(f"{speed_id}: done already")
        else:
            record = efficiency_row(args.model, args.sparsity, args)
            print(f"{speed_id}: {json.dumps(record['ratios_pruned_over_dense'])} -> {write_row(STAGE, speed_id, record)}")
    if args.only != "speed":
        if is_done(STAGE, scoring_id):
            print(f"{scoring_id}: done already")
        else:
            record = scoring_row(args.model, args)
            print(f"{scoring_id}: {json.dumps(record['ratios_rku_checkpointed_over_taylor'])} -> {write_row(STAGE, scoring_id, record)}")


if __name__ == "__main__":
    main()
