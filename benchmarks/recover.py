"""Prune-and-recover rows: `train.py` (iterative pruning with LoRA recovery), one importance per row.

    python -m benchmarks.run recover --methods rku flap [--preset cpu]

Every row runs ``python train.py --config configs/qwen0.5b-gsm8k.yaml --pruning.importance=METHOD`` in
its own process: the same config, data, steps and seeds for every method, only the importance differs.
`--preset cpu` adds overrides that fit a 2-core machine in minutes instead of hours (fewer rounds and
steps, shorter sequences, CoT NLL validation without generation); they are recorded in the row. The row
holds the run's report (every round's sparsity, size, metrics and phase times) and, for comparison
with the one-shot rows, the exported model's CoT NLL on the same 32 GSM8K test questions with
per-question sums (bootstrap intervals, paired gaps between methods). `<preset>-seed<S>` runs a preset of
`SEEDED` again under seed S, so that a gap between two methods can be told from one run's draw.

A row whose run was interrupted (a session's end, a crash) resumes from the run's latest round-end
checkpoint when it is run again, so the hours-long `full` preset can be finished in several sittings.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from rku_lightning.evaluation.data import load_problems
from rku_lightning.evaluation.evaluate import evaluate_model, nll_columns
from rku_lightning.files import write_text_atomic
from rku_lightning.pruning.export import load_pruned

from .common import DATA, ROOT, WORK, is_done, row_path, write_row

STAGE = "recover"
CONFIG = "configs/qwen0.5b-gsm8k.yaml"
#: A 2-core machine's budget: fewer rounds and steps, shorter sequences, 32 validation questions.
CPU_BUDGET = [
    "--pruning.rounds=2",
    "--pruning.recovery_steps=16",
    "--pruning.calibration_batches=8",
    "--data.batch_size=2",
    "--data.max_length=256",
    "--data.val_limit=32",
]
#: Uniform allocation (where one-shot pruning kept most accuracy) with answers generated for 32 + 32
#: questions; the dense model's accuracy on them is in the one-shot rows, so no round 0.
CPU_UNIFORM = [*CPU_BUDGET, "--pruning.allocation=uniform", "--data.ood_limit=32", "--evaluate_dense=false"]
#: The reasoning issue's method: calibration and recovery on the dense model's own traces, recovery by
#: forward KL to the dense teacher.
KD_SELF = ["--model.recovery=kd", "--data.train_source=self", "--data.calibration_source=self"]
#: On the CPU budget: 64 training questions (one pass of 2 rounds x 16 steps x 2), 16 calibration traces.
CPU_KD_SELF = [*CPU_UNIFORM, *KD_SELF, "--data.calibration_samples=16", "--data.trace_samples=64"]

#: One GPU (benchmarks/gpu_reasoning.sh): the config's budget (4 rounds to 40 %, 50 steps of 4 sequences), uniform
#: allocation, 100 + 100 validation questions in batches of 100; answers and traces up to 512 tokens in 640-token
#: windows, so that neither the cap nor the window decides gold vs self (RESULTS.md, "Why the answers are wrong").
GPU_BUDGET = ["--trainer.accelerator=gpu", "--data.eval_batch_size=100", "--pruning.allocation=uniform",
              "--model.max_new_tokens=512", "--data.trace_max_new_tokens=512", "--data.max_length=640"]
GPU_KD_SELF = [*KD_SELF, "--data.trace_samples=800"]
#: MLP channels only, ranked across layers: where one-shot 40 % kept most (README, "Allocation").
GLOBAL_MLP = ["--pruning.allocation=global", "--pruning.attention=none"]


def with_option(overrides: list[str], option: str) -> list[str]:
    """`overrides` with `option` (`--key=value`) in place of the value it had there."""
    key = option.split("=", 1)[0] + "="
    return [*(o for o in overrides if not o.startswith(key)), option]


#: Overrides on top of CONFIG; "full" is the config's budget (hours on CPU, minutes on a GPU) with the
#: global allocation it had when those rows were measured (the config's default is uniform since).
PRESETS: dict[str, list[str]] = {
    "full": ["--pruning.allocation=global"],
    "cpu": [*CPU_BUDGET, "--model.generate=false", "--pruning.allocation=global"],
    "cpu-uniform": CPU_UNIFORM,
    # kl_to_dense on the dense model's answers to the 32 validation questions.
    "cpu-uniform-kd-self": CPU_KD_SELF,
    # The same in a window that holds the prompt and the whole trace: a 256-token window holds only the
    # opening of most traces (RESULTS.md, "Why the answers are wrong"). About 2.5x the recovery time.
    "cpu-uniform-kd-self-L640": with_option(CPU_KD_SELF, "--data.max_length=640"),
    # Its gold-CE pair in the same window: 256 tokens cut 18 % of GSM8K-train's gold solution tokens too (README).
    "cpu-uniform-L640": with_option(CPU_UNIFORM, "--data.max_length=640"),
    # Both to the other targets, 30 % and 20 % (where its goal is 90 % of dense), with the same rounds,
    # steps and window.
    **{
        f"{name}-{percent}": with_option(
            with_option(base, "--data.max_length=640"), f"--pruning.target_sparsity={percent / 100}"
        )
        for percent in (30, 20)
        for name, base in {"cpu-uniform-kd-self-L640": CPU_KD_SELF, "cpu-uniform-L640": CPU_UNIFORM}.items()
    },
    # One GPU (GPU_BUDGET), each with its overrides.
    **{
        f"gpu-{name}": functools.reduce(with_option, extra, GPU_BUDGET)
        for name, extra in {
            "ce-gold": [],
            "kd-self": GPU_KD_SELF,
            "recovery-only": ["--pruning.rounds=1", "--pruning.target_sparsity=0.001", "--evaluate_dense=false"],
            # The second target, after the 40 % rows.
            "ce-gold-30": ["--pruning.target_sparsity=0.3"],
            "kd-self-30": [*GPU_KD_SELF, "--pruning.target_sparsity=0.3"],
            # The CPU rows' global MLP-only pick at 40 % (run with `--method kinetic`), under both recoveries.
            "global-mlp-ce-gold": GLOBAL_MLP,
            "global-mlp-kd-self": [*GPU_KD_SELF, *GLOBAL_MLP],
        }.items()
    },
    # Where one-shot 40 % kept most (README, "Allocation"): MLP channels only, ranked across layers, with the
    # reasoning issue's recovery and with its gold-CE pair; run with `--method kinetic` (its one-shot pick).
    **{
        f"cpu-global-mlp-{name}": functools.reduce(with_option, ["--data.max_length=640", *GLOBAL_MLP], base)
        for name, base in {"kd-self-L640": CPU_KD_SELF, "L640": CPU_UNIFORM}.items()
    },
    # The control for it: one round of the same recovery after removing only 0.1 % (the least a
    # run may target), so that what LoRA recovery alone does to accuracy can be told from pruning.
    "cpu-recovery-only": with_option(
        with_option(CPU_UNIFORM, "--pruning.rounds=1"), "--pruning.target_sparsity=0.001"
    ),
}
#: The recovery budget alone: `cpu-uniform-L640` with three times the LoRA steps per round (and so three times the
#: training questions). Is the CPU budget what keeps RKU below the goal?
PRESETS["cpu-uniform-L640-steps48"] = with_option(PRESETS["cpu-uniform-L640"], "--pruning.recovery_steps=48")
#: The same question for KD: `cpu-uniform-kd-self-L640` with twice the LoRA steps per round and twice the dense traces,
#: so that each step still learns from a new question (one pass of 2 rounds x 32 steps x 2 over 128). The calibration
#: sample (16 traces) is the same; the training order over the larger set is not.
PRESETS["cpu-uniform-kd-self-L640-steps32"] = functools.reduce(
    with_option, ["--pruning.recovery_steps=32", "--data.trace_samples=128"], PRESETS["cpu-uniform-kd-self-L640"]
)
#: RESP's calibration (docs/method.md, "Calibration source"): each round scores on traces the model writes as it is then,
#: pruned and recovered so far, instead of the dense model's; recovery stays KD on the dense model's traces.
PRESETS["cpu-uniform-kd-current-L640"] = with_option(PRESETS["cpu-uniform-kd-self-L640"], "--data.calibration_source=current")
#: KD on the dense model's traces with RKU's scores calibrated on gold solutions instead (the same 16 questions' count):
#: calibrated on the dense traces, RKU's 40 % model drifts from dense on the arithmetic tokens where FLAP's does not
#: (README, "Where the two models drift"), and one-shot gold calibration kept RKU's arithmetic better than FLAP's.
PRESETS["cpu-uniform-kd-gold-calibration-L640"] = with_option(PRESETS["cpu-uniform-kd-self-L640"], "--data.calibration_source=gold")
#: Half of each: calibrated on gold text RKU kept the arithmetic and lost the prose that ends an answer, on dense traces
#: the reverse (README, "KD recovery with RKU calibrated on gold text"); the same 16 questions, every second one's gold
#: solution and the others' dense traces. Does one sample keep both?
PRESETS["cpu-uniform-kd-mixed-calibration-L640"] = with_option(PRESETS["cpu-uniform-kd-self-L640"], "--data.calibration_source=mixed")
#: Only the dense model's right traces (`trace_keep=correct`), for calibration and for recovery: most of its traces are
#: wrong (12-15 of 64), and KD on them teaches its mistakes. 160 questions give about 30 right traces for 64 training
#: sequences; calibration samples the same 160 (one cached trace set) and takes its first 16 right ones.
PRESETS["cpu-uniform-kd-correct-L640"] = functools.reduce(
    with_option, ["--data.trace_keep=correct", "--data.trace_samples=160", "--data.calibration_samples=160"],
    PRESETS["cpu-uniform-kd-self-L640"],
)

#: The presets each KD preset is compared with in RESULTS.md, best pair first: the same budget and questions with
#: gold-text CE (for L640, in the same window if that method was run so, else in the default one).
BASELINES: dict[str, tuple[str, ...]] = {
    "cpu-uniform-kd-self": ("cpu-uniform",),
    "cpu-uniform-kd-self-L640": ("cpu-uniform-L640", "cpu-uniform"),
    "cpu-uniform-kd-self-L640-30": ("cpu-uniform-L640-30",),
    "cpu-uniform-kd-self-L640-20": ("cpu-uniform-L640-20",),
    "cpu-global-mlp-kd-self-L640": ("cpu-global-mlp-L640",),
    "gpu-kd-self": ("gpu-ce-gold",),
    "gpu-kd-self-30": ("gpu-ce-gold-30",),
    "gpu-global-mlp-kd-self": ("gpu-global-mlp-ce-gold",),
}

#: The preset whose runs (every method) a preset that changes one thing is paired with in RESULTS.md: for what is pruned,
#: the same recovery, budget and questions with the uniform allocation, or calibrated on the dense model's traces; for
#: the recovery budget, the same pruning, recovery and questions with the CPU budget's steps.
REFERENCES: dict[str, str] = {
    "cpu-uniform-L640-steps48": "cpu-uniform-L640",
    "cpu-uniform-kd-self-L640-steps32": "cpu-uniform-kd-self-L640",
    "cpu-uniform-kd-current-L640": "cpu-uniform-kd-self-L640",
    "cpu-uniform-kd-gold-calibration-L640": "cpu-uniform-kd-self-L640",
    "cpu-uniform-kd-mixed-calibration-L640": "cpu-uniform-kd-self-L640",
    "cpu-uniform-kd-correct-L640": "cpu-uniform-kd-self-L640",
    "cpu-global-mlp-kd-self-L640": "cpu-uniform-kd-self-L640",
    "cpu-global-mlp-L640": "cpu-uniform-L640",
    "gpu-global-mlp-kd-self": "gpu-kd-self",
    "gpu-global-mlp-ce-gold": "gpu-ce-gold",
}

#: How many of each set's first test questions the one-shot rows that chose the non-uniform allocation answered
#: (`oneshot_q64_L640*/`): a recovered model's gap on the questions after them is one no choice was fitted to.
PICKED_ON = 64

#: Presets run again under another seed as `<preset>-seed<S>`: one recovery run is one draw of the LoRA adapters'
#: initialisation, every round's random streams, the calibration sample and the order of the recovery data, and a
#: gap between two methods can be that draw's. The questions answered stay the same, so seeds pair per question.
SEEDED: tuple[str, ...] = (
    "cpu-uniform-L640", "cpu-global-mlp-L640", "cpu-uniform-kd-self-L640", "cpu-uniform-kd-self-L640-20",
    "cpu-uniform-kd-self-L640-30", "cpu-uniform-L640-30", "cpu-uniform-L640-20", "cpu-global-mlp-kd-self-L640",
    "cpu-uniform-L640-steps48", "cpu-uniform-kd-current-L640",
)
SEEDS: tuple[int, ...] = (1,)
SEED_SUFFIX = "-seed"
PRESETS |= {
    f"{p}{SEED_SUFFIX}{s}": [*PRESETS[p], f"--seed_everything={s}", f"--pruning.seed={s}", f"--data.seed={s}"]
    for p in SEEDED for s in SEEDS
}
REFERENCES |= {f"{p}{SEED_SUFFIX}{s}": f"{REFERENCES[p]}{SEED_SUFFIX}{s}" for p in SEEDED if p in REFERENCES for s in SEEDS}
BASELINES |= {
    f"{p}{SEED_SUFFIX}{s}": tuple(f"{b}{SEED_SUFFIX}{s}" for b in BASELINES[p] if b in SEEDED)
    for p in SEEDED if p in BASELINES for s in SEEDS
}


def preset_seed(preset: str) -> tuple[str, int]:
    """The preset a seeded preset repeats, and its seed: `cpu-uniform-L640-seed1` -> (`cpu-uniform-L640`, 1)."""
    base, suffix, seed = preset.rpartition(SEED_SUFFIX)
    return (base, int(seed)) if suffix and seed.isdigit() else (preset, 0)


def row_id(method: str, preset: str) -> str:
    return f"qwen0.5b-{method}-{preset}"


def train_command(method: str, preset: str, extra: list[str] = ()) -> list[str]:
    name = row_id(method, preset)
    return [
        sys.executable, "train.py", "--config", CONFIG, f"--pruning.importance={method}",
        f"--run_name={name}", f"--output_root={WORK / STAGE}", *PRESETS[preset], *extra,
    ]


def run_dir(method: str, preset: str) -> Path:
    return WORK / STAGE / row_id(method, preset)


def latest_checkpoint(method: str, preset: str) -> Path | None:
    """The round-end checkpoint an interrupted run of this row left behind, if any."""
    found = sorted((run_dir(method, preset) / "checkpoints").glob("round-end*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def final_scores(method: str, preset: str, threads: int, limit: int = 32) -> dict:
    """CoT NLL of the exported (compacted, LoRA-merged) model, scored like the one-shot rows."""
    torch.set_num_threads(threads)
    model, tokenizer = load_pruned(run_dir(method, preset) / "model")
    problems = load_problems(DATA / "gsm8k" / "test.jsonl", task="gsm8k", limit=limit)
    result = evaluate_model(model, tokenizer, problems, generate=False, nll_batch_size=2, perplexity=False, progress=False)
    return {
        "gsm8k_limit": limit,
        "gsm8k": result["metrics"],
        "gsm8k_nll": nll_columns(result["predictions"]),
        "gsm8k_indices": [p.index for p in problems],
    }


def keep_generations(method: str, preset: str) -> Path | None:
    """Copy the run's validation answers (every round) beside the row: accuracy gaps are paired per question."""
    rounds = {int(path.stem.removeprefix("round-")): path for path in (run_dir(method, preset) / "generations").glob("round-*.jsonl")}
    if not rounds:
        return None
    lines = [
        json.dumps({"round": index, **json.loads(line)}) for index in sorted(rounds) for line in rounds[index].read_text().splitlines()
    ]
    target = row_path(STAGE, row_id(method, preset)).with_suffix(".generations.jsonl")
    write_text_atomic(target, "\n".join(lines) + "\n")
    return target


def run_row(method: str, preset: str, threads: int, extra: list[str] = ()) -> dict:
    """Run train.py for `method` (resuming an interrupted run) and return the row record (raises if it fails)."""
    checkpoint = latest_checkpoint(method, preset)
    resumed_from, resume = None, []
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["callbacks"]
        rounds_done = next(v for k, v in state.items() if k.startswith("RKUPruning"))["records"][-1]["round"]
        resumed_from = {"checkpoint": str(checkpoint), "rounds_done": rounds_done}
        print(f"{row_id(method, preset)}: resuming after round {rounds_done} from {checkpoint}")
        resume = [f"--ckpt_path={checkpoint}"]
    command = train_command(method, preset, [*extra, *resume])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in the child
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    report = json.loads((run_dir(method, preset) / "report.json").read_text())
    return {
        "method": method,
        "preset": preset,
        "config": CONFIG,
        "overrides": PRESETS[preset] + list(extra),
        "train_command": " ".join(["python", *command[1:]]),
        "threads": threads,
        "wall_s": round(time.perf_counter() - started, 1),
        "resumed_from": resumed_from,
        # Phase times summed over every round, whichever sitting ran it.
        "compute_s": round(sum(v for r in report["rounds"] for k, v in r.items() if k.startswith("time_")), 1),
        "report": report,
        "final": final_scores(method, preset, threads),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recover", description="Run one prune-and-recover row.")
    parser.add_argument("--method", required=True, help="importance name, e.g. rku or flap")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--final-only", action="store_true", help="add the final scoring to an existing row")
    args, extra = parser.parse_known_args(argv)
    rid = row_id(args.method, args.preset)
    if args.final_only:
        record = json.loads(row_path(STAGE, rid).read_text())
        record["final"] = final_scores(args.method, args.preset, args.threads)
        print(f"{rid}: final CoT NLL {record['final']['gsm8k']['cot_nll']:.3f} -> {row_path(STAGE, rid)}")
        write_text_atomic(row_path(STAGE, rid), json.dumps(record, indent=2))
        return
    if is_done(STAGE, rid):
        print(f"{rid}: done already")
        return
    record = run_row(args.method, args.preset, args.threads, extra)
    keep_generations(args.method, args.preset)
    path = write_row(STAGE, rid, record)
    print(f"{rid}: -> {path}")


if __name__ == "__main__":
    main()
