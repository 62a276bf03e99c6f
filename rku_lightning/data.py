"""Math word-problem sets in one record form: question, gold solution text (if any), numeric answer.

Sources are a local JSONL file (or a folder holding ``{split}.jsonl``) or a ``datasets`` hub id; both
are read through ``datasets``. Local files are checked line by line first so that a bad line is
reported with its file and line number instead of an Arrow parse error.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from .metrics import parse_number

TASKS = ("gsm8k", "svamp", "jsonl")


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_lines(path: Path, task: str, fields: FieldSpec) -> tuple[list[int], list[str]]:
    """Line numbers of usable records and a `file:line: reason` message for every malformed one."""
    good, errors = [], []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                to_problem(row, task, fields, index=0)
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                errors.append(f"{path}:{line_no}: {error}")
                continue
            good.append(line_no)
    return good, errors


def _resolve_local(source: Path, split: str | None) -> Path:
    if source.is_dir():
        path = source / f"{split or 'test'}.jsonl"
        if not path.is_file():
            raise ValueError(f"source: folder {source} has no {path.name} (split={split or 'test'!r})")
        return path
    return source


def load_problems(
    source: str | os.PathLike,
    task: str = "gsm8k",
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
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not supported; choose one of {TASKS}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be a positive number of records, got {limit}")
    defaults = DEFAULT_FIELDS[task]
    fields = FieldSpec(
        question=question_field or defaults.question,
        answer=answer_field if answer_field is not None else defaults.answer,
        solution=solution_field if solution_field is not None else defaults.solution,
    )
    local = Path(source)
    if local.exists():
        path = _resolve_local(local, split)
        good, errors = _check_lines(path, task, fields)
        if errors and strict:
            raise ValueError(f"source: {len(errors)} malformed line(s):\n" + "\n".join(errors))
        if errors:
            shown = "\n".join(errors[:20]) + (f"\n... and {len(errors) - 20} more" if len(errors) > 20 else "")
            warnings.warn(f"skipping {len(errors)} malformed line(s) of {path}:\n{shown}", stacklevel=2)
        if not good:
            raise ValueError(f"source: {path} has no usable record" + (f" ({errors[0]})" if errors else ""))
        if errors:
            # The JSON reader would stop at the first bad line: hand datasets the good records only.
            with open(path, encoding="utf-8") as handle:
                lines = handle.readlines()
            rows = datasets.Dataset.from_list([json.loads(lines[n - 1]) for n in good])
        else:
            rows = datasets.load_dataset("json", data_files=str(path), split="train")
        indices = [n - 1 for n in good]  # 0-based line numbers
        result = ProblemSet([], str(source), task, split, str(path.resolve()), _sha256(path), errors)
    else:
        hub_split = split or "test"
        try:
            rows = datasets.load_dataset(str(source), config or HUB_CONFIGS.get(task), split=hub_split)
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds; say what was tried
            raise ValueError(
                f"source: {source!r} is neither an existing path nor a loadable hub dataset ({error})"
            ) from error
        indices = list(range(len(rows)))
        result = ProblemSet([], str(source), task, hub_split)
    count = len(rows) if limit is None else min(limit, len(rows))
    bad_rows = []  # only hub rows can fail here: local lines were checked above
    for position in range(count):
        try:
            result.problems.append(to_problem(rows[position], task, fields, indices[position]))
        except ValueError as error:
            bad_rows.append(f"{source}[{indices[position]}]: {error}")
    if bad_rows:
        warnings.warn(f"skipping {len(bad_rows)} malformed record(s):\n" + "\n".join(bad_rows[:20]), stacklevel=2)
        result.skipped.extend(bad_rows)
    if not result.problems:
        raise ValueError(f"source: {source!r} has no usable record ({result.skipped[0] if result.skipped else 'empty'})")
    return result
