"""One-shot quality rows: prune the dense model once (no recovery) and measure its reasoning.

Each row runs in its own process (`python -m benchmarks.oneshot --row ROW_ID ...`): load the
model, prune with the engine, compact, evaluate with `rku_lightning.evaluation.evaluate.evaluate_model`.
Calibration statistics are the engine's running sums on a fixed GSM8K-train sample; they are
computed once per (model, objective, sample) by the first row that needs them and cached under
`benchmarks/work/`, because every one-shot row starts from the same dense model (the statistics
are identical whichever row computes them; the cache only saves CPU hours).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from rku_lightning import StructuredPruner, compact, load_causal_lm
from rku_lightning.evaluation.calibration import calibration_batches, self_calibration_problems
from rku_lightning.evaluation.data import load_problems
from rku_lightning.evaluation.evaluate import NLL_KEYS, answer_metrics, evaluate_model, kl_per_problem, nll_columns
from rku_lightning.evaluation.traces import as_problems, cached_traces
from rku_lightning.files import sha256_file

from .common import DATA, MODELS, WORK, row_path, write_row

STAGE = "oneshot"
#: Rows without generation (CoT NLL only) live apart, so that a full row never gets mistaken for one.
NLL_STAGE = "oneshot_nll"
#: (importance, objective, attention) of every method row; `kinetic` is RKU without the Fisher-trace
#: normalisation; `query_heads` rows keep every KV group (separates KV-group removal from the scores);
#: `none` rows prune MLP channels only (where a method puts its MLP budget, without attention at all).
METHODS: tuple[tuple[str, str, str], ...] = (
    ("rku", "ce", "groups"),
    ("rku", "hidden", "groups"),
    ("kinetic", "ce", "groups"),
    ("taylor", "ce", "groups"),
    ("magnitude", "ce", "groups"),
    ("wanda_sp", "ce", "groups"),
    ("flap", "ce", "groups"),
    ("random", "ce", "groups"),
    ("rku", "ce", "query_heads"),
    ("kinetic", "ce", "query_heads"),
    ("flap", "ce", "query_heads"),
    ("rku", "ce", "none"),
    ("kinetic", "ce", "none"),
    ("flap", "ce", "none"),
)
#: Row-id suffix of each non-default attention mode.
ATTENTION_SUFFIXES = {"query_heads": "_qheads", "none": "_mlp"}


@dataclass(frozen=True)
class Settings:
    """Everything a row's numbers depend on besides the method; recorded in every row."""

    calib_samples: int = 16
    calib_max_length: int = 256
    gsm8k_limit: int = 32
    svamp_limit: int = 32
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    #: torch threads; 1 is ~8x faster than 2 on a 2-core machine that runs anything else (measured).
    threads: int = 1
    #: False: teacher-forced CoT NLL only (minutes instead of an hour per row on 2 CPU cores).
    generate: bool = True
    #: The plain-text perplexity pass doubles the cost of scoring and is not a benchmark metric.
    perplexity: bool = False
    #: Chains of thought to calibrate on: the data set's (`gold`) or the dense model's own (`self`).
    calib_source: str = "gold"
    #: Teacher-forced KL(dense || pruned) on the GSM8K questions (dense answers and gold solutions).
    kl: bool = True
    #: Where the row computes: `auto` is the GPU when there is one (benchmarks/gpu_reasoning.sh), else the CPU.
    device: str = "auto"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)

    @property
    def stage(self) -> str:
        """Where the row lives: NLL-only rows apart, a non-default question count, calibration size or seed in
        its own folder, so that rows measured differently never share a table."""
        base = STAGE if self.generate else NLL_STAGE
        if self.gsm8k_limit != Settings.gsm8k_limit:
            base += f"_q{self.gsm8k_limit}"
        if self.calib_samples != Settings.calib_samples:
            base += f"_c{self.calib_samples}"
        if self.max_new_tokens != Settings.max_new_tokens:
            base += f"_t{self.max_new_tokens}"
        if self.calib_max_length != Settings.calib_max_length:
            base += f"_L{self.calib_max_length}"
        if self.calib_source != Settings.calib_source:
            base += f"_{self.calib_source}"
        if self.seed != Settings.seed:
            base += f"_s{self.seed}"  # another calibration sample: a second measurement, never the first's file
        return base


@dataclass(frozen=True)
class Row:
    model: str
    importance: str | None  # None: the dense model
    objective: str = "ce"
    allocation: str = "global"
    sparsity: float = 0.0
    attention: str = "groups"  # "query_heads": prune query heads, keep every KV group; "none": MLP only

    @property
    def method(self) -> str:
        """The importance, with `_hidden` / `_qheads` when the objective / attention mode is not the default."""
        if self.importance is None:
            return "dense"
        suffixes = ("_hidden" if self.objective == "hidden" else "") + ATTENTION_SUFFIXES.get(self.attention, "")
        return self.importance + suffixes

    @property
    def row_id(self) -> str:
        if self.importance is None:
            return f"{self.model}-dense"
        return f"{self.model}-{self.method}-{self.allocation}-{round(self.sparsity * 100)}"

    @classmethod
    def parse(cls, row_id: str) -> "Row":
        model, rest = row_id.split("-", 1)
        if rest == "dense":
            return cls(model, None)
        method, allocation, percent = rest.rsplit("-", 2)
        attention = next((mode for mode, suffix in ATTENTION_SUFFIXES.items() if method.endswith(suffix)), "groups")
        method = method.removesuffix(ATTENTION_SUFFIXES.get(attention, ""))
        objective = "hidden" if method.endswith("_hidden") else "ce"
        return cls(model, method.removesuffix("_hidden"), objective, allocation, int(percent) / 100, attention)


def grid(models: list[str], sparsities: list[float], allocations: list[str]) -> list[Row]:
    rows = [Row(m, None) for m in models]
    for m in models:
        for allocation in allocations:
            for s in sparsities:
                rows += [Row(m, imp, obj, allocation, s, attention) for imp, obj, attention in METHODS]
    return rows


def _stats_path(model: str, objective: str, settings: Settings) -> Path:
    source = "" if settings.calib_source == "gold" else f"-{settings.calib_source}"
    if settings.calib_source != "gold" and settings.max_new_tokens != Settings.max_new_tokens:
        source += f"-T{settings.max_new_tokens}"  # generated traces end at the answer cap
    tag = f"{model}-{objective}-n{settings.calib_samples}-L{settings.calib_max_length}-s{settings.seed}{source}"
    return WORK / "stats" / f"{tag}.pt"


def calibrated_pruner(row: Row, model, tokenizer, settings: Settings) -> tuple[StructuredPruner, dict]:
    """A pruner for `row` holding the cached statistics (computing and caching them if missing)."""
    pruner = StructuredPruner(
        model, importance=row.importance, allocation=row.allocation, objective=row.objective,
        attention=row.attention, seed=settings.seed,
    )
    timing: dict = {}
    if not pruner.importance.needs_calibration:
        return pruner, timing
    # Gradient passes also record activations, so Wanda-sp / FLAP read the `ce` statistics.
    path = _stats_path(row.model, row.objective, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Rows may run in parallel: one computes the statistics, the others wait for it and read them.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            pruner.stats.load_state_dict(torch.load(path))
            timing["calibration"] = "cached"
            return pruner, timing
        timing.update(_calibrate_and_cache(row, model, tokenizer, settings, path))
    pruner.stats.load_state_dict(torch.load(path))
    return pruner, timing


def _calibrate_and_cache(row: Row, model, tokenizer, settings: Settings, path: Path) -> dict:
    problems = load_problems(DATA / "gsm8k" / "train.jsonl", task="gsm8k", split="train").problems
    if settings.calib_source == "self":  # the model is still dense here: these are the dense model's traces
        problems, _ = self_calibration_problems(
            model, tokenizer, problems, settings.calib_samples, settings.seed, "all", settings.max_new_tokens, settings.batch_size
        )
    batches = calibration_batches(
        tokenizer, problems, settings.calib_samples, 4, settings.calib_max_length,
        questions_only=row.objective == "hidden", seed=settings.seed,
    )
    scorer = StructuredPruner(model, importance="rku", objective=row.objective)
    started = time.perf_counter()
    scorer.calibrate(batches)
    seconds = round(time.perf_counter() - started, 1)
    tmp = path.with_suffix(".tmp")
    torch.save(scorer.stats.state_dict(), tmp)
    os.replace(tmp, path)
    return {"calibrate_s": seconds}


def base_answers(stage: str, row_id: str, settings: Settings) -> dict:
    """The answers of the same row measured with the same settings on fewer questions (in `stage`), to extend: its
    record and its kept answers per set by question index. Fails, before any compute, on anything else."""
    path = row_path(stage, row_id)
    answers = path.with_suffix(".predictions.jsonl")
    if not path.is_file() or not answers.is_file():
        raise FileNotFoundError(f"--extend-from {stage}: no row {row_id} with kept answers there ({path})")
    record = json.loads(path.read_text())
    recorded = {**LEGACY_SETTINGS, **record["settings"]}
    limits = {name: recorded[name] for name in ("gsm8k_limit", "svamp_limit")}
    if not settings.generate or {**recorded, "threads": settings.threads} != asdict(replace(settings, **limits)):
        raise ValueError(f"--extend-from {stage}: {row_id} there was measured with other settings than these "
                         f"(only --gsm8k-limit and --svamp-limit may differ, and answers must be generated)")
    if any(limit > getattr(settings, name) or limit % settings.batch_size for name, limit in limits.items()):
        raise ValueError(f"--extend-from {stage}: its question counts {limits} must be at most this row's and whole "
                         f"batches of {settings.batch_size}, so that the new questions are batched as in one pass")
    found: dict = {"record": record, "gsm8k": {}, "svamp": {}}
    for line in answers.read_text().splitlines():
        answer = json.loads(line)
        found[answer.pop("set")][answer["index"]] = answer
    return found


def _same_scores(scored: list[dict], known: dict[int, dict], rel: float = 1e-4) -> bool:
    """Whether teacher-forced CoT NLL sums equal those kept with the answers: then the two models are the same
    (kept answers without scores show nothing, so they never pass)."""
    by_index = {p["index"]: p for p in scored}
    kept = {i: answer for i, answer in known.items() if "cot_nll_sum" in answer}
    return bool(kept) and all(
        i in by_index and all(abs(by_index[i][k] - answer[k]) <= rel * max(1.0, abs(answer[k])) for k in NLL_KEYS)
        for i, answer in kept.items()
    )


def extended_answers(model, tokenizer, problems: list, known: dict[int, dict], settings: Settings) -> tuple[list[dict], dict]:
    """Greedy answers to `problems` where the first ones have `known` answers from this same model: only the rest
    are generated, with the first batch of known ones again as controls (batched as one pass over all would be).
    A control that comes back changed means the answers do not reproduce here: then all are generated."""
    controls = [p for p in problems if p.index in known][: settings.batch_size]
    rest = [p for p in problems if p.index not in known]
    fresh = evaluate_model(model, tokenizer, controls + rest, settings.batch_size, settings.max_new_tokens, nll=False)["predictions"]
    unchanged = sum(new["prediction"] == known[new["index"]]["prediction"] for new in fresh[: len(controls)])
    if unchanged < len(controls):
        print(f"{unchanged} of {len(controls)} control answers came back unchanged: generating every answer")
        fresh = evaluate_model(model, tokenizer, problems, settings.batch_size, settings.max_new_tokens, nll=False)["predictions"]
        known = {}
    by_index = {**{i: {k: v for k, v in a.items() if k not in NLL_KEYS} for i, a in known.items()},
                **{p["index"]: p for p in fresh}}
    return [by_index[p.index] for p in problems], {"reused": len(problems) - len(fresh), "controls": len(controls), "controls_unchanged": unchanged}


def _answer_sets(model, tokenizer, gsm8k, svamp, settings: Settings, base: dict | None) -> tuple[dict, dict, dict | None]:
    """`evaluate_model` on both sets as a row measures them, or the same from a row on fewer questions (`base`)
    extended with answers to the rest, where the pruned model is shown to be the row's own (same CoT NLL)."""
    score = dict(nll_batch_size=2, perplexity=settings.perplexity)
    if base is None:
        g = evaluate_model(model, tokenizer, gsm8k, settings.batch_size, settings.max_new_tokens, generate=settings.generate, **score)
        s = evaluate_model(model, tokenizer, svamp, settings.batch_size, settings.max_new_tokens, nll=False) if settings.generate else {
            "metrics": {}, "predictions": []}
        return g, s, None
    scored = evaluate_model(model, tokenizer, gsm8k, generate=False, **score)
    same = _same_scores(scored["predictions"], base["gsm8k"])
    extended = {"from": base["record"]["stage"], "same_model": same}
    results = {}
    for name, problems in (("gsm8k", gsm8k), ("svamp", svamp)):
        answers, extended[name] = extended_answers(model, tokenizer, list(problems), base[name] if same else {}, settings)
        results[name] = {"metrics": answer_metrics(answers, settings.max_new_tokens), "predictions": answers}
    nll = {p["index"]: p for p in scored["predictions"]}
    results["gsm8k"]["metrics"].update(scored["metrics"])
    results["gsm8k"]["predictions"] = [{**p, **nll.get(p["index"], {})} for p in results["gsm8k"]["predictions"]]
    return results["gsm8k"], results["svamp"], extended


def run_row(row: Row, settings: Settings, extend_from: str | None = None) -> dict:
    """Measure `row`; `extend_from` names the stage of the same row on fewer questions whose answers to keep."""
    base = base_answers(extend_from, row.row_id, settings) if extend_from else None
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    timings: dict = {}
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(MODELS[row.model])
    model.to(settings.torch_device)
    timings["load_s"] = round(time.perf_counter() - started, 1)
    report = None
    if row.importance is not None:
        pruner, calib = calibrated_pruner(row, model, tokenizer, settings)
        timings.update(calib)
        started = time.perf_counter()
        report = pruner.prune(row.sparsity).to_dict()
        compact(model)
        timings["prune_s"] = round(time.perf_counter() - started, 1)
    gsm8k_path, svamp_path = DATA / "gsm8k" / "test.jsonl", DATA / "svamp" / "test.jsonl"
    gsm8k = load_problems(gsm8k_path, task="gsm8k", limit=settings.gsm8k_limit)
    svamp = load_problems(svamp_path, task="svamp", limit=settings.svamp_limit)
    started = time.perf_counter()
    # Teacher-forced scoring in pairs: full-vocabulary logits of 8 long sequences take gigabytes.
    g, s, extended = _answer_sets(model, tokenizer, gsm8k, svamp, settings, base)
    timings["answers_s"] = round(time.perf_counter() - started, 1)
    kl_columns: dict = {}
    if settings.kl and row.importance is not None:
        started = time.perf_counter()
        kl = kl_to_dense(model, tokenizer, row.model, gsm8k.problems, settings)
        kl_columns = kl.pop("kl_columns")
        g["metrics"].update(kl)
        timings["kl_s"] = round(time.perf_counter() - started, 1)
    return {
        "row": asdict(row),
        "settings": asdict(settings),
        "model_source": MODELS[row.model],
        "params": sum(p.numel() for p in model.parameters()),
        "report": report,
        "gsm8k": g["metrics"],
        "svamp": s["metrics"],
        "gsm8k_correct": [p["correct"] for p in g["predictions"]] if settings.generate else [],
        "svamp_correct": [p["correct"] for p in s["predictions"]],
        # Per-question CoT NLL sums (aligned with gsm8k_indices), for bootstrap intervals on the NLL.
        "gsm8k_nll": nll_columns(g["predictions"]),
        # Per-question KL sums and token counts ({"kl_to_dense": {"index", "kl_sum", "tokens"}, ...}).
        "gsm8k_kl": kl_columns,
        "gsm8k_indices": [p.index for p in gsm8k],
        "svamp_indices": [p.index for p in svamp] if settings.generate else [],
        "data": {
            "gsm8k_test": {"path": str(gsm8k_path), "sha256": sha256_file(gsm8k_path)},
            "svamp_test": {"path": str(svamp_path), "sha256": sha256_file(svamp_path)},
            "gsm8k_train": {"path": str(DATA / "gsm8k" / "train.jsonl"), "sha256": sha256_file(DATA / "gsm8k" / "train.jsonl")},
        },
        "timings": timings,
        # Rows on more questions that kept the answers of the same row on fewer (`--extend-from`): how, and the checks.
        **({"extended": extended} if extended else {}),
        "predictions": {"gsm8k": g["predictions"], "svamp": s["predictions"]},
    }


def kl_to_dense(model, tokenizer, model_key: str, problems: list, settings: Settings) -> dict:
    """KL(dense || pruned) per token on the dense model's own (cached) answers and on the gold solutions,
    with each question's KL sum and token count (`kl_columns`, for paired intervals)."""
    reference, _ = load_causal_lm(MODELS[model_key])
    reference.to(settings.torch_device)
    traces, _ = cached_traces(reference, tokenizer, problems, settings.max_new_tokens, settings.batch_size, progress=False)
    metrics: dict = {"kl_columns": {}}
    for name, texts in (("kl_to_dense", as_problems(traces)), ("kl_to_dense_gold", problems)):
        rows = kl_per_problem(model, reference, tokenizer, texts, 2, progress=False)
        metrics[name] = sum(r["kl_sum"] for r in rows) / sum(r["tokens"] for r in rows)
        metrics[f"{name}_reasoning"] = sum(r["kl_sum_reasoning"] for r in rows) / max(1, sum(r["tokens_reasoning"] for r in rows))
        metrics["kl_columns"][name] = {key: [r[key] for r in rows] for key in rows[0]}
    return metrics


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    for name, value in asdict(Settings()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)


def settings_flags(settings: Settings) -> list[str]:
    """The command-line form of `settings`, for a row's own process."""
    flags = []
    for name, value in asdict(settings).items():
        flag = name.replace("_", "-")
        flags.append((f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag}={value}")
    return flags


#: What rows written before a setting existed were measured with.
LEGACY_SETTINGS = {"calib_source": "gold", "kl": False, "device": "auto"}


def measured_with(stage: str, row_id: str, settings: Settings) -> bool:
    """Whether the row exists and was measured with these settings and columns (a row measured otherwise, e.g.
    before KL to dense or its split by token class existed, is measured again and replaced). The thread count is not compared: it changes
    speed and, through summation order, only the last digits (RKU calibration on 1 vs 2 threads: CoT NLL
    within 0.003 of each other at 20-40 %)."""
    path = row_path(stage, row_id)
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    if settings.kl and any("kl_sum_reasoning" not in columns for columns in record.get("gsm8k_kl", {}).values()):
        return False  # measured before KL was split by token class
    recorded = {**LEGACY_SETTINGS, **record["settings"]}
    return {**recorded, "threads": settings.threads} == asdict(settings)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(**{name: getattr(args, name) for name in asdict(Settings())})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.oneshot", description="Run one one-shot row.")
    parser.add_argument("--row", required=True, help="row id, e.g. qwen0.5b-rku-global-40 or qwen0.5b-dense")
    add_settings_arguments(parser)
    parser.add_argument("--extend-from", metavar="STAGE", help="keep the answers of this row measured on fewer questions "
                        "in STAGE (e.g. oneshot_L640_self) and generate only the rest, checked against controls")
    args = parser.parse_args(argv)
    settings = settings_from(args)
    if measured_with(settings.stage, args.row, settings):
        print(f"{args.row}: done already")
        return
    record = run_row(Row.parse(args.row), settings, args.extend_from)
    predictions = record.pop("predictions")
    path = write_row(settings.stage, args.row, record)
    lines = [json.dumps({"set": name, **p}) for name, rows in predictions.items() for p in rows]
    path.with_suffix(".predictions.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{args.row}: GSM8K {record['gsm8k'].get('accuracy')} SVAMP {record['svamp'].get('accuracy')} -> {path}")


if __name__ == "__main__":
    main()
