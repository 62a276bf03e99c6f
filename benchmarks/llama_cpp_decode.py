"""Decode speed in llama.cpp: the 40 % pruned GGUF against the dense GGUF, side by side in one run.

``python -m benchmarks.llama_cpp_decode --model smollm2 --sparsity 0.4`` writes ``llama_cpp/{model}-{pct}``
(``-fa`` appended with ``--flash-attn``):

* the pruned model is the efficiency row's (RKU, CE, global allocation, KV groups, the one-shot stage's
  calibration statistics: `efficiency.pruned_export`), so the llama.cpp ratio sits beside the
  transformers ratio of row ``efficiency/{model}-{pct}``, which the row copies when it exists;
* both models are written by `save_gguf` at the same weight type (default f16), the dense one from the
  same source model, so the ratio measures the pruning, not a quantisation difference;
* both are loaded once (llama-cpp-python, the build of `make llama-cpp`) and timed alternately, the order
  flipped every repeat: after an untimed prefill of a fixed prompt, `new_tokens` greedy decode steps of
  batch 1 (one `eval` of one token each, EOS ignored) are timed one by one. A repeat's speed is
  1 / (median step time): a step that another process preempted does not move it, where the mean
  would. Per-repeat speeds (their median, min, max, standard deviation) and the per-repeat
  pruned/dense ratios are recorded, and the mean-based tokens/s beside them.

The machines these rows come from are shared: the load average before and after is recorded, and the
spread across the interleaved repeats is the measure of how much that moved the numbers. One llama.cpp
thread is the default: on two cores that other jobs also use, two threads wait on each other at every
barrier and vary by 20x between repeats (measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import llama_cpp
import numpy as np
import torch

from rku_lightning import load_causal_lm
from rku_lightning.pruning.gguf import GGUF_TYPES, save_gguf

from .common import MODELS, WORK, row_path, write_row
from .efficiency import PROMPT, pruned_export

STAGE = "llama_cpp"


def decode_step_seconds(llm, prompt_ids: list[int], new_tokens: int) -> list[float]:
    """Seconds of each greedy batch-1 decode step after an untimed prefill (one llama.cpp `eval` of one token)."""
    llm.reset()
    llm.eval(prompt_ids)
    steps = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        started = time.perf_counter()
        llm.eval([token])
        steps.append(time.perf_counter() - started)
    return steps


def _spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "stdev": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
        "runs": [round(v, 3) for v in values],
    }


def compare(paths: dict[str, str], prompt_ids: list[int], reps: int, new_tokens: int, threads: int, flash_attn: bool) -> dict:
    """Interleaved repeats over models loaded once; the order flips every repeat so drift hits both alike."""
    llms = {name: llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                                  flash_attn=flash_attn, verbose=False)
            for name, path in paths.items()}
    for llm in llms.values():  # warm-up: page the weights in, build the compute graphs
        decode_step_seconds(llm, prompt_ids, 4)
    median_based: dict[str, list[float]] = {name: [] for name in llms}
    mean_based: dict[str, list[float]] = {name: [] for name in llms}
    for rep in range(reps):
        for name in list(llms) if rep % 2 == 0 else list(llms)[::-1]:
            steps = decode_step_seconds(llms[name], prompt_ids, new_tokens)
            median_based[name].append(1 / statistics.median(steps))
            mean_based[name].append(len(steps) / sum(steps))
    for llm in llms.values():
        llm.close()
    return {
        "decode_b1_tokens_per_s": {name: _spread(values) for name, values in median_based.items()},
        "ratio_pruned_over_dense": _spread([p / d for p, d in zip(median_based["pruned"], median_based["dense"])]),
        "mean_based": {
            "decode_b1_tokens_per_s": {name: _spread(values) for name, values in mean_based.items()},
            "ratio_pruned_over_dense": _spread([p / d for p, d in zip(mean_based["pruned"], mean_based["dense"])]),
        },
    }


def transformers_ratio(model_key: str, pct: int) -> dict | None:
    """The transformers decode ratio of the matching efficiency row, if it was measured."""
    path = row_path("efficiency", f"{model_key}-{pct}")
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    return {"row": f"efficiency/{model_key}-{pct}", "decode_b1_tokens_per_s": row["ratios_pruned_over_dense"]["decode_b1_tokens_per_s"],
            "environment": row["environment"]}


def llama_cpp_row(model_key: str, sparsity: float, args) -> dict:
    pct = round(sparsity * 100)
    folder = WORK / STAGE
    export_dir = WORK / "efficiency" / f"{model_key}-rku-global-{pct}"
    made = pruned_export(model_key, sparsity, export_dir)
    paths = {"dense": folder / f"{model_key}-dense.{args.dtype}.gguf", "pruned": folder / f"{model_key}-rku-global-{pct}.{args.dtype}.gguf"}
    dense, tokenizer = load_causal_lm(MODELS[model_key])
    save_gguf(dense, tokenizer, paths["dense"], args.dtype, overwrite=True)
    del dense
    pruned, _ = load_causal_lm(export_dir)
    save_gguf(pruned, tokenizer, paths["pruned"], args.dtype, overwrite=True, metadata=pruned.rku_pruning_plan)
    del pruned
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    load_before = os.getloadavg()
    measured = compare({k: str(v) for k, v in paths.items()}, prompt_ids, args.reps, args.new_tokens, args.threads,
                       args.flash_attn)
    load_after = os.getloadavg()
    return {
        "model": model_key,
        "model_source": MODELS[model_key],
        "sparsity": sparsity,
        "pruned_model": {"method": "rku, objective ce, allocation global, attention groups, min_mlp_keep 0.1",
                         "report": made["report"], "calibration": made["calibration"]},
        "gguf": {name: {"file": str(p.relative_to(WORK.parent.parent)), "bytes": p.stat().st_size} for name, p in paths.items()},
        **measured,
        "transformers": transformers_ratio(model_key, pct),
        "settings": {"reps": args.reps, "new_tokens": args.new_tokens, "threads": args.threads, "dtype": args.dtype,
                     "flash_attn": args.flash_attn, "speed": "1 / median decode-step time per repeat",
                     "prompt": PROMPT, "prompt_tokens": len(prompt_ids), "greedy": True, "interleaved": True,
                     "llama_cpp_python": llama_cpp.__version__},
        "machine_note": "shared machine: other jobs ran on the same 2 CPU cores during the measurement; "
                        "compare the per-repeat ratios and their spread, not absolute tokens/s",
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llama_cpp_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), nargs="+", default=["smollm2"])
    parser.add_argument("--sparsity", type=float, default=0.4)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (see the module docstring)")
    parser.add_argument("--flash-attn", action="store_true",
                        help="llama.cpp flash attention: without it, per-layer exports pad the V cache to the widest layer")
    parser.add_argument("--dtype", default="f16", choices=sorted(GGUF_TYPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # pruning and export only: one thread is the fast setting on 2 shared cores
    for model_key in args.model:
        row = llama_cpp_row(model_key, args.sparsity, args)
        path = write_row(STAGE, f"{model_key}-{round(args.sparsity * 100)}" + ("-fa" if args.flash_attn else ""), row)
        ratio = row["ratio_pruned_over_dense"]
        print(f"{model_key}: llama.cpp decode ratio {ratio['median']} (min {ratio['min']}, max {ratio['max']}) -> {path}")


if __name__ == "__main__":
    main()
