"""Where a recovered model drifts from the dense one: KL on the arithmetic tokens and on the rest.

    python -m benchmarks.recover_kl --method rku --preset cpu-uniform-kd-self-L640-steps32

A recover row logs `val/kl_to_dense`: KL(dense || model) per token of the dense model's answers, averaged
over all of them, so the few tokens that decide an answer (numbers, `=`, operators: the CoT NLL's reasoning
class) weigh little in it. KD lowers that average; does it lower the drift on those tokens too? This stage
scores the row's exported model against the dense model on the row's own validation questions, one question
at a time (no padding), on the dense model's answers and on the gold solutions, split by that token class,
and keeps per-question sums for paired intervals (`recover_kl/<row id>.json`). Its KL over all tokens of the
dense answers must reproduce the row's last logged `val/kl_to_dense` (`reproduces`): the export is
LoRA-merged and compacted, the validated model was not. A row whose export is gone is rebuilt as
`recover_answers` rebuilds it (the row's `train.py` command without per-round generation).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rku_lightning import load_causal_lm
from rku_lightning.evaluation.data import load_problems
from rku_lightning.evaluation.evaluate import kl_per_problem
from rku_lightning.evaluation.traces import as_problems, cached_traces
from rku_lightning.pruning.export import load_pruned

from . import recover
from .common import is_done, row_path, write_row
from .recover_answers import exported_model, saved_config, validation_sources

STAGE = "recover_kl"
#: What each text set is, with the metric the row logged on it (the reproduction check uses the first).
TEXTS = {"dense": "val/kl_to_dense", "gold": "val/kl_to_dense_gold"}
#: Relative tolerance of `reproduces`: fp32 sums over a few thousand tokens in another order.
TOLERANCE = 1e-3


def split_columns(rows: list[dict]) -> dict[str, list]:
    """`kl_per_problem`'s rows as per-question columns, with the non-arithmetic tokens' share made explicit."""
    columns = {key: [r[key] for r in rows] for key in ("index", "kl_sum", "tokens", "kl_sum_reasoning", "tokens_reasoning")}
    columns["kl_sum_other"] = [r["kl_sum"] - r["kl_sum_reasoning"] for r in rows]
    columns["tokens_other"] = [r["tokens"] - r["tokens_reasoning"] for r in rows]
    return columns


def summary(columns: dict[str, list]) -> dict[str, float]:
    """Per-token KL over all tokens, the arithmetic ones and the rest; the arithmetic tokens' share of tokens and of KL."""
    total = {key: sum(columns[key]) for key in ("kl_sum", "tokens", "kl_sum_reasoning", "tokens_reasoning", "kl_sum_other", "tokens_other")}
    return {
        "kl": total["kl_sum"] / total["tokens"],
        "kl_reasoning": total["kl_sum_reasoning"] / max(1, total["tokens_reasoning"]),
        "kl_other": total["kl_sum_other"] / max(1, total["tokens_other"]),
        "reasoning_token_share": total["tokens_reasoning"] / total["tokens"],
        "reasoning_kl_share": total["kl_sum_reasoning"] / total["kl_sum"] if total["kl_sum"] else 0.0,
    }


def kl_row(method: str, preset: str, threads: int) -> dict:
    """The row record (see the module docstring)."""
    base = json.loads(row_path(recover.STAGE, recover.row_id(method, preset)).read_text())
    logged = base["report"]["rounds"][-1]["metrics"]
    if logged.get(TEXTS["dense"]) is None:
        raise ValueError(f"{recover.row_id(method, preset)}: the row logged no {TEXTS['dense']} (reference_traces off?); nothing to reproduce")
    torch.set_num_threads(threads)
    started = time.perf_counter()
    folder, _ = exported_model(method, preset, threads)
    config = saved_config(folder.parent)
    data = config["data"]
    model, _ = load_pruned(folder)
    dense, tokenizer = load_causal_lm(config["model"]["pretrained"])
    model.eval()
    dense.eval()
    gold = load_problems(**validation_sources(folder.parent)["gsm8k"], limit=data["val_limit"])
    # The data module's own lookup: the same dense model, questions and settings find the traces the row used.
    traces, lookup = cached_traces(dense, tokenizer, gold, data["trace_max_new_tokens"], data["eval_batch_size"], data["trace_cache"])
    texts = {"dense": as_problems(traces, "all"), "gold": gold}
    loaded = time.perf_counter()
    record: dict = {"method": method, "preset": preset, "round": base["report"]["rounds"][-1]["round"],
                    "sparsity": base["report"]["rounds"][-1]["sparsity"], "threads": threads, "traces_cached": lookup["hit"]}
    for name, problems in texts.items():
        columns = split_columns(kl_per_problem(model, dense, tokenizer, problems, batch_size=1, max_length=data["max_length"]))
        record[name] = {**summary(columns), "logged": logged.get(TEXTS[name]), "per_question": columns}
    measured, expected = record["dense"]["kl"], record["dense"]["logged"]
    record["reproduces"] = abs(measured - expected) <= TOLERANCE * max(abs(expected), 1e-6)
    record["timings"] = {"model_s": round(loaded - started, 1), "kl_s": round(time.perf_counter() - loaded, 1)}
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recover_kl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, help="importance name of the recover row, e.g. rku or flap")
    parser.add_argument("--preset", choices=sorted(recover.PRESETS), required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    rid = recover.row_id(args.method, args.preset)
    if not is_done(recover.STAGE, rid):
        parser.error(f"no recover row {rid}: run `python -m benchmarks.recover --method {args.method} --preset {args.preset}` first")
    if is_done(STAGE, rid):
        print(f"{rid} in {STAGE}: done already")
        return
    record = kl_row(args.method, args.preset, args.threads)
    path = write_row(STAGE, rid, record)
    dense = record["dense"]
    state = "reproduces" if record["reproduces"] else "does NOT reproduce"
    print(f"{rid}: KL to dense on its answers {dense['kl']:.4f} ({state} the logged {dense['logged']:.4f}); "
          f"arithmetic tokens {dense['kl_reasoning']:.4f}, other {dense['kl_other']:.4f} -> {path}")


if __name__ == "__main__":
    main()
