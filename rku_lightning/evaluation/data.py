"""Math word-problem sets in one record form: question, gold solution text (if any), numeric answer.

Sources are a local JSONL file (or a folder holding ``{split}.jsonl``) or a ``datasets`` hub id; both
are read through ``datasets``. Local lines are parsed one by one so that a bad line is reported with
its file and line number and skipped (or, with ``strict``, raised) instead of failing the whole set.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import datasets

from rku_lightning.checks import one_of, positive_int
from rku_lightning.files import sha256_file

from .metrics import parse_number

Task = Literal["gsm8k", "svamp", "jsonl"]
TASKS: tuple[str, ...] = get_args(Task)


@dataclass(frozen=True)
class Problem:
    """One problem. `index` is the record's 0-based position in its source, so results point back to it."""

    question: str
    solution: str | None
    answer: float
    index: int


@dataclass(frozen=True)
class FieldSpec:
    """Where a record keeps its question, its numeric answer and its worked solution."""

    question: str
    answer: str | None
    solution: str | None


DEFAULT_FIELDS = {
    # GSM8K has no separate answer field: the answer is the `#### N` line of the solution.
    "gsm8k": FieldSpec(question="question", answer=None, solution="answer"),
    "svamp": FieldSpec(question="input", answer="target", solution=None),
    "jsonl": FieldSpec(question="question", answer="answer", solution=None),
}
HUB_CONFIGS = {"gsm8k": "main"}


@dataclass
class ProblemSet:
    """Problems plus where they came from (path and sha256 for local files), for reproducible reports."""

    problems: list[Problem]
    source: str
    task: str
    split: str | None = None
    path: str | None = None
    sha256: str | None = None
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def __getitem__(self, item: int) -> Problem:
        return self.problems[item]

    def provenance(self) -> dict:
        return {"source": self.source, "task": self.task, "split": self.split, "path": self.path, "sha256": self.sha256}


def gsm8k_answer(solution: str) -> float:
    """The number after the final ``####`` of a GSM8K solution."""
    if "####" not in solution:
        raise ValueError("solution has no '#### N' final line")
    value = parse_number(solution.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"'#### {solution.rsplit('####', 1)[1].strip()}' is not a number")
    return value


def to_problem(row: dict, task: str, fields: FieldSpec, index: int) -> Problem:
    """Convert one raw record; raises ValueError saying which field is wrong."""
    question = row.get(fields.question)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"field {fields.question!r} is missing or not a non-empty string")
    solution = row.get(fields.solution) if fields.solution else None
    if solution is not None and not isinstance(solution, str):
        raise ValueError(f"field {fields.solution!r} is not a string")
    if fields.answer is not None:
        if fields.answer not in row or row[fields.answer] is None:
            raise ValueError(f"field {fields.answer!r} is missing")
        answer = parse_number(row[fields.answer])
        if answer is None:
            raise ValueError(f"field {fields.answer!r} = {row[fields.answer]!r} is not a number")
    elif solution:
        answer = gsm8k_answer(solution)
    else:
        raise ValueError(f"no answer: field {fields.solution!r} is missing and no answer field is configured")
    if task == "gsm8k" and solution is None:
        raise ValueError(f"field {fields.solution!r} is missing")
    return Problem(question=question.strip(), solution=solution.strip() if solution else None, answer=answer, index=index)


def _read_jsonl(path: Path, task: str, fields: FieldSpec) -> tuple[list[Problem], list[str]]:
    """Problems of a JSONL file and a `file:line: reason` message for every malformed line.

    datasets' "text" builder reads the file (one row per line, blank ones included, so row numbers are
    line numbers); each line is parsed here because the JSON builder stops at the first bad line
    without naming it and rejects columns whose type varies between records.
    """
    if path.stat().st_size == 0:
        raise ValueError(f"source: {path} is empty; it needs one JSON record per line")
    lines = datasets.load_dataset("text", data_files=str(path), split="train")["text"]
    problems, errors = [], []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            problems.append(to_problem(row, task, fields, index=line_no - 1))
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            errors.append(f"{path}:{line_no}: {error}")
    return problems, errors


def _resolve_local(source: Path, split: str | None) -> Path:
    if source.is_dir():
        path = source / f"{split or 'test'}.jsonl"
        if not path.is_file():
            raise ValueError(f"source: folder {source} has no {path.name} (split={split or 'test'!r})")
        return path
    return source


def load_problems(
    source: str | os.PathLike,
    task: Task = "gsm8k",
    split: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
    limit: int | None = None,
    config: str | None = None,
    strict: bool = False,
) -> ProblemSet:
    """Load a problem set from a JSONL path, a folder with ``{split}.jsonl``, or a hub id.

    Malformed local lines are skipped with a warning naming file and line (an error when `strict`);
    a set with no usable record is always an error. `limit` keeps the first N records.
    """
    one_of("task", task, TASKS)
    positive_int("limit", limit, optional=True)
    defaults = DEFAULT_FIELDS[task]
    fields = FieldSpec(
        question=question_field or defaults.question,
        answer=answer_field if answer_field is not None else defaults.answer,
        solution=solution_field if solution_field is not None else defaults.solution,
    )
    local = Path(source)
    if local.exists():
        path = _resolve_local(local, split)
        problems, errors = _read_jsonl(path, task, fields)
        if errors and strict:
            raise ValueError(f"source: {len(errors)} malformed line(s):\n" + "\n".join(errors))
        result = ProblemSet(problems[:limit], str(source), task, split, str(path.resolve()), sha256_file(path), errors)
    else:
        hub_split = split or "test"
        try:
            rows = datasets.load_dataset(str(source), config or HUB_CONFIGS.get(task), split=hub_split)
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds; say what was tried
            raise ValueError(
                f"source: {source!r} is neither an existing path nor a loadable hub dataset ({error})"
            ) from error
        result = ProblemSet([], str(source), task, hub_split)
        for index in range(len(rows) if limit is None else min(limit, len(rows))):
            try:
                result.problems.append(to_problem(rows[index], task, fields, index))
            except ValueError as error:
                result.skipped.append(f"{source}[{index}]: {error}")
    if result.skipped:
        shown = "\n".join(result.skipped[:20])
        more = f"\n... and {len(result.skipped) - 20} more" if len(result.skipped) > 20 else ""
        warnings.warn(f"skipping {len(result.skipped)} malformed record(s):\n{shown}{more}", stacklevel=2)
    if not result.problems:
        first = f" ({result.skipped[0]})" if result.skipped else ""
        raise ValueError(f"source: {source!r} has no usable record{first}")
    if limit is not None and len(result) < limit:
        warnings.warn(f"limit={limit} but {source} has {len(result)} usable records: using {len(result)}", stacklevel=2)
    return result
