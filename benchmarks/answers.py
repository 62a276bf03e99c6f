"""Why the answers are wrong: the kept generations of every benchmark row, question by question.

A wrong answer has three causes that look the same in an accuracy column: the token cap cut it before
the final answer, the plan was wrong, or the arithmetic of a right plan was wrong. For each question this
records whether it was cut, whether it was right, and how many of its written binary steps
(`rku_lightning.evaluation.arithmetic`) are computed right; `render` turns them into intervals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import yaml

from rku_lightning.evaluation.arithmetic import written_steps

from .common import RESULTS, ROOT


@dataclass
class AnswerSet:
    """One model's answers to one data set: per-question flags and step counts, aligned by position."""

    label: str
    sparsity: float
    cap: int
    task: str
    correct: list[bool] = field(default_factory=list)
    cut: list[bool] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    steps_right: list[int] = field(default_factory=list)

    def add(self, text: str, tokens: int, correct: bool) -> None:
        checked = written_steps(text)
        self.correct.append(bool(correct))
        self.cut.append(tokens >= self.cap)
        self.steps.append(len(checked))
        self.steps_right.append(sum(step.correct for step in checked))


def oneshot_answer_sets() -> list[AnswerSet]:
    """The one-shot rows' answers (every `oneshot*` folder), labelled by row id and folder suffix."""
    sets = []
    for path in sorted(RESULTS.glob("oneshot*/*.predictions.jsonl")):
        row = json.loads(path.with_name(path.name.replace(".predictions.jsonl", ".json")).read_text())
        suffix = path.parent.name.removeprefix("oneshot").lstrip("_")
        label = row["row_id"] + (f" ({suffix.replace('_', ', ')})" if suffix else "")
        sparsity = (row.get("report") or {}).get("sparsity", 0.0)
        by_task: dict[str, AnswerSet] = {}
        for answer in map(json.loads, filter(None, path.read_text().splitlines())):
            if "prediction" not in answer:  # a teacher-forced-only entry
                continue
            task = answer["set"]
            if task not in by_task:
                by_task[task] = AnswerSet(label, sparsity, row["settings"]["max_new_tokens"], task)
            by_task[task].add(answer["prediction"], answer["generated_tokens"], answer["correct"])
        sets += by_task.values()
    return sets


def answer_cap(row: dict) -> int:
    """The answer cap of a recover row: a `recover_answers` row's own, else the run's config's
    `model.max_new_tokens` or its override."""
    if "cap" in row:
        return row["cap"]
    for override in row["overrides"]:
        if override.startswith("--model.max_new_tokens="):
            return int(override.split("=", 1)[1])
    return yaml.safe_load((ROOT / row["config"]).read_text())["model"]["max_new_tokens"]


def recover_answer_sets() -> list[AnswerSet]:
    """Each prune-and-recover run's kept validation answers, one set per round and task; then the final
    answers under longer caps and on more questions (`benchmarks.recover_answers`, folders `recover_t<CAP>`, `recover_q<N>`)."""
    sets = []
    paths = sorted((RESULTS / "recover").glob("*.generations.jsonl")) + sorted(RESULTS.glob("recover_*/*.generations.jsonl"))
    for path in paths:
        row = json.loads(path.with_name(path.name.replace(".generations.jsonl", ".json")).read_text())
        sparsity = {row["round"]: row["sparsity"]} if "cap" in row else {r["round"]: r["sparsity"] for r in row["report"]["rounds"]}
        cap = answer_cap(row)
        suffix = path.parent.name.removeprefix("recover").lstrip("_")
        by_key: dict[tuple[int, str], AnswerSet] = {}
        for answer in map(json.loads, filter(None, path.read_text().splitlines())):
            key = (answer["round"], "svamp" if answer["task"] == "ood" else answer["task"])
            if key not in by_key:
                by_key[key] = AnswerSet(f"{row['row_id']} round {key[0]}" + (f" ({suffix})" if suffix else ""), sparsity.get(key[0], 0.0), cap, key[1])
            by_key[key].add(answer["text"], answer["tokens"], answer["correct"])
        sets += [by_key[key] for key in sorted(by_key)]
    return sets


def answer_sets() -> list[AnswerSet]:
    """Every benchmark row's answers: one-shot rows, then prune-and-recover rounds."""
    return oneshot_answer_sets() + recover_answer_sets()
