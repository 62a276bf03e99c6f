"""A prune-and-recover row's final answers under a longer answer cap: is it the cap or the model?

    python -m benchmarks.recover_cap --method rku --preset cpu-uniform-kd-self-L640 --cap 512

Recover rows validate with the config's 256-token cap, and the models recovered by distillation on the
dense model's traces write answers as long as those traces, so the cap cuts more of them than of the
gold-CE models' answers. This stage lets the row's own exported model finish the final round's answers
that used the whole cap, and leaves the others as they were: a greedy answer that ended within the old
cap ends the same way under a longer one. Two checks make that a measurement of the cap alone, and both
are recorded in the row:

- `same_model`: a row whose exported model is gone (a fresh machine) is rebuilt by the row's own
  `train.py` command without per-round generation (which samples nothing), and every round's
  teacher-forced `val/kl_to_dense` and `val/cot_nll` must equal the row's. A model that differs has
  all its answers regenerated instead, and the row says so.
- `cut_same_start`: each regenerated cut answer must repeat the old one up to the old cap, and the
  `controls` (the first finished answers of each task, regenerated as well) must come back unchanged:
  the exported model is LoRA-merged and compacted, the validated one was not, so this is not a given.

The row (`recover_t<CAP>/<row id>.json`) holds per-question results for pairing; its answers
(`.generations.jsonl`, every final-round answer, as `recover` keeps them) feed "Why the answers are wrong".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
import yaml

from rku_lightning.evaluation.data import load_problems
from rku_lightning.evaluation.evaluate import evaluate_model
from rku_lightning.files import write_text_atomic
from rku_lightning.paths import shared_data_dir
from rku_lightning.pruning.export import load_pruned

from . import recover
from .answers import answer_cap
from .common import ROOT, is_done, row_path, write_row

#: The teacher-forced metrics every round logs with or without generation: equal values, equal model.
CHECKED = ("val/kl_to_dense", "val/cot_nll")
TASKS = {"gsm8k": "val", "ood": "ood"}  # the kept answers' task -> the data module's prefix for its questions


def stage(cap: int) -> str:
    return f"{recover.STAGE}_t{cap}"


def same_model(row_rounds: list[dict], rebuilt_rounds: list[dict], rel: float = 1e-5) -> tuple[bool, list[dict]]:
    """Whether two runs' rounds logged the same teacher-forced metrics, and the values side by side."""
    pairs = [
        {"round": a["round"], **{key: [a["metrics"].get(key), b["metrics"].get(key)] for key in CHECKED}}
        for a, b in zip(row_rounds, rebuilt_rounds)
    ]
    equal = len(row_rounds) == len(rebuilt_rounds) and all(
        a["round"] == b["round"] and all(
            (x := a["metrics"].get(key)) is not None and (y := b["metrics"].get(key)) is not None
            and abs(x - y) <= rel * max(1.0, abs(x))
            for key in CHECKED
        )
        for a, b in zip(row_rounds, rebuilt_rounds)
    )
    return equal, pairs


def exported_model(method: str, preset: str, threads: int) -> tuple[Path, dict]:
    """The row's exported model, rebuilt without per-round generation when the scratch folder lacks it."""
    run = recover.run_dir(method, preset)
    if not (run / "model").is_dir():
        print(f"{recover.row_id(method, preset)}: no exported model in {run}; rebuilding it without per-round generation")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(recover.train_command(method, preset, ["--model.generate=false"]), cwd=ROOT, env=env, check=True)
    return run / "model", json.loads((run / "report.json").read_text())


def _final_answers(method: str, preset: str) -> tuple[int, list[dict]]:
    """The last round and its kept answers (`recover.keep_generations`)."""
    path = row_path(recover.STAGE, recover.row_id(method, preset)).with_suffix(".generations.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no kept answers; run the row with generation first (`benchmarks.recover`)")
    answers = [json.loads(line) for line in path.read_text().splitlines() if line]
    last = max(a["round"] for a in answers)
    return last, [a for a in answers if a["round"] == last]


def validation_sources(run: Path) -> dict[str, tuple[str, str, str]]:
    """Where a run's validation questions came from, per generations task: (source, task, split), from the
    config `train.py` saved in the run folder (a `*_data` left unset means the task's shared folder)."""
    found = sorted(run.glob("**/config.yaml"))
    if not found:
        raise FileNotFoundError(f"{run}: no saved config.yaml; the run's questions are unknown (rerun the row)")
    data = yaml.safe_load(found[0].read_text())["data"]
    sources = {}
    for task, prefix in TASKS.items():
        name = data.get(f"{prefix}_task", "svamp" if prefix == "ood" else "gsm8k")
        sources[task] = (data.get(f"{prefix}_data") or str(shared_data_dir() / name), name, data.get(f"{prefix}_split") or "test")
    return sources


def _problems(source: tuple[str, str, str], indices: list[int], golds: list[float]) -> list:
    path, task, split = source
    problems = {p.index: p for p in load_problems(path, task=task, split=split, limit=max(indices) + 1)}
    chosen = [problems[i] for i in indices]
    if [p.answer for p in chosen] != golds:
        raise ValueError(f"{path}: its {task} answers differ from the kept ones; not the questions the row answered")
    return chosen


def finish_answers(model, tokenizer, answers: list[dict], sources: dict, old_cap: int, cap: int, everything: bool,
                   controls: int, batch_size: int) -> list[dict]:
    """`answers` with those cut at `old_cap` regenerated under `cap`, in their order; also the first `controls`
    finished ones per task (all answers when `everything`), which must come back unchanged."""
    redo = []
    for task in TASKS:
        mine = [a for a in answers if a["task"] == task]
        finished = [a for a in mine if a["tokens"] < old_cap]
        chosen = {id(a) for a in finished[:controls]}
        redo += [a for a in mine if everything or a["tokens"] >= old_cap or id(a) in chosen]
    fresh: dict[tuple[str, int], dict] = {}
    for task in TASKS:
        mine = [a for a in redo if a["task"] == task]
        if not mine:
            continue
        problems = _problems(sources[task], [a["index"] for a in mine], [a["answer"] for a in mine])
        result = evaluate_model(model, tokenizer, problems, batch_size, cap, nll=False, progress=True)
        for old, new in zip(mine, result["predictions"]):
            cut = old["tokens"] >= old_cap
            fresh[(task, old["index"])] = {
                **old, "predicted": new["extracted_answer"], "correct": bool(new["correct"]), "tokens": int(new["generated_tokens"]),
                "text": new["prediction"], "regenerated": True,
                # A cut answer may end mid-character: its text is a prefix once the partial character is dropped.
                "same_start": new["prediction"].startswith(old["text"].rstrip("\ufffd")) if cut else new["prediction"] == old["text"],
                "was_cut": cut,
            }
    return [fresh.get((a["task"], a["index"]), {**a, "regenerated": False, "was_cut": a["tokens"] >= old_cap}) for a in answers]


def cap_row(method: str, preset: str, cap: int, threads: int, batch_size: int, controls: int = 8) -> tuple[dict, list[dict]]:
    """The row record and its answers (see the module docstring)."""
    base = json.loads(row_path(recover.STAGE, recover.row_id(method, preset)).read_text())
    old_cap = answer_cap(base)
    if cap <= old_cap:
        raise ValueError(f"--cap {cap}: must exceed the row's own answer cap ({old_cap} tokens)")
    last, answers = _final_answers(method, preset)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    folder, report = exported_model(method, preset, threads)
    equal, checked = same_model(base["report"]["rounds"], report["rounds"])
    model, tokenizer = load_pruned(folder)
    model.eval()
    loaded = time.perf_counter()
    finished = finish_answers(model, tokenizer, answers, validation_sources(folder.parent), old_cap, cap, not equal, controls, batch_size)
    per_task = {}
    for task in TASKS:
        before = [a for a in answers if a["task"] == task]
        after = [a for a in finished if a["task"] == task]
        per_task[task] = {
            "indices": [a["index"] for a in after],
            "correct": [a["correct"] for a in after],
            f"correct_at_{old_cap}": [bool(a["correct"]) for a in before],
            "cut": [a["tokens"] >= cap for a in after],
            f"cut_at_{old_cap}": [a["tokens"] >= old_cap for a in before],
            # Cut answers regenerated, and how many repeat the old one up to the old cap; finished answers
            # regenerated as controls, and how many came back unchanged.
            "cut_regenerated": sum(a["regenerated"] and a["was_cut"] for a in after),
            "cut_same_start": sum(a["regenerated"] and a["was_cut"] and a["same_start"] for a in after),
            "controls": sum(a["regenerated"] and not a["was_cut"] for a in after),
            "controls_unchanged": sum(a["regenerated"] and not a["was_cut"] and a["same_start"] for a in after),
        }
    record = {
        "method": method, "preset": preset, "cap": cap, "base_cap": old_cap, "round": last,
        "sparsity": base["report"]["rounds"][-1]["sparsity"], "threads": threads, "batch_size": batch_size, "controls": controls,
        "same_model": equal, "checked_rounds": checked, **per_task,
        "timings": {"model_s": round(loaded - started, 1), "generate_s": round(time.perf_counter() - loaded, 1)},
    }
    return record, finished


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recover_cap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, help="importance name of the recover row, e.g. rku or flap")
    parser.add_argument("--preset", choices=sorted(recover.PRESETS), required=True)
    parser.add_argument("--cap", type=int, default=512, help="the longer answer cap in new tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--controls", type=int, default=8, help="finished answers per task to regenerate as a check")
    args = parser.parse_args(argv)
    rid = recover.row_id(args.method, args.preset)
    if not is_done(recover.STAGE, rid):
        parser.error(f"no recover row {rid}: run `python -m benchmarks.recover --method {args.method} --preset {args.preset}` first")
    if is_done(stage(args.cap), rid):
        print(f"{rid} at {args.cap} tokens: done already")
        return
    record, answers = cap_row(args.method, args.preset, args.cap, args.threads, args.batch_size, args.controls)
    # The answers first: the row is what marks the stage done.
    write_text_atomic(row_path(stage(args.cap), rid).with_suffix(".generations.jsonl"), "".join(json.dumps(a) + "\n" for a in answers))
    path = write_row(stage(args.cap), rid, record)
    print(f"{rid}: GSM8K {sum(record['gsm8k']['correct'])} OOD {sum(record['ood']['correct'])} at {args.cap} tokens -> {path}")


if __name__ == "__main__":
    main()
