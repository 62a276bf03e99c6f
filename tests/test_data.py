"""Problem-set loading: the shared GSM8K/SVAMP files, generic JSONL, hub ids, and bad input."""

from __future__ import annotations

import json

import datasets
import pytest

from rku_lightning.evaluation import data
from rku_lightning.evaluation.data import Problem, load_problems


def _write(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_gsm8k_test_set(shared_data) -> None:
    problems = load_problems(shared_data / "gsm8k" / "test.jsonl", "gsm8k", limit=5)
    assert len(problems) == 5
    first = problems[0]
    assert first.index == 0 and first.answer == 18.0
    assert first.question.startswith("Janet") and first.solution.endswith("#### 18")
    assert problems.sha256 and len(problems.sha256) == 64 and problems.path.endswith("test.jsonl")


def test_gsm8k_thousands_separator_answers(shared_data) -> None:
    problems = load_problems(shared_data / "gsm8k" / "test.jsonl", "gsm8k")
    assert len(problems) == 1319
    assert 1450000.0 in {p.answer for p in problems}
    assert [p.index for p in problems] == list(range(1319))


def test_folder_and_split(shared_data) -> None:
    train = load_problems(shared_data / "gsm8k", "gsm8k", split="train", limit=2)
    assert train.path.endswith("train.jsonl")
    with pytest.raises(ValueError, match="split"):
        load_problems(shared_data / "gsm8k", "gsm8k", split="validation")


def test_svamp(shared_data) -> None:
    problems = load_problems(shared_data / "svamp" / "test.jsonl", "svamp", limit=3)
    assert problems[0] == Problem(
        question="Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack. "
        "How much do you have to pay to buy each pack?",
        solution=None,
        answer=51.0,
        index=0,
    )


def test_generic_jsonl_with_custom_fields(tmp_path) -> None:
    path = _write(
        tmp_path / "set.jsonl",
        [json.dumps({"q": "What is 2+2?", "a": "4", "why": "2 + 2 = 4"}), "", json.dumps({"q": "Half of 9?", "a": 4.5})],
    )
    problems = load_problems(path, "jsonl", question_field="q", answer_field="a", solution_field="why")
    assert [(p.question, p.answer, p.solution) for p in problems] == [("What is 2+2?", 4.0, "2 + 2 = 4"), ("Half of 9?", 4.5, None)]


def test_malformed_lines_are_reported_with_file_and_line(tmp_path) -> None:
    good = json.dumps({"question": "Q?", "answer": "It is 1.\n#### 1"})
    path = _write(
        tmp_path / "bad.jsonl",
        [good, "{not json", json.dumps({"question": "Q?"}), json.dumps(["a list"]), json.dumps({"question": "Q", "answer": "#### x"}), good],
    )
    with pytest.warns(UserWarning) as caught:
        problems = load_problems(path, "gsm8k")
    message = str(caught[0].message)
    for line in (2, 3, 4, 5):
        assert f"{path}:{line}:" in message
    assert f"{path}:1:" not in message and f"{path}:6:" not in message
    assert [p.index for p in problems] == [0, 5]
    assert len(problems.skipped) == 4
    with pytest.raises(ValueError, match=f"{path}:2:"):
        load_problems(path, "gsm8k", strict=True)


def test_no_usable_record_is_an_error(tmp_path) -> None:
    path = _write(tmp_path / "empty.jsonl", [json.dumps({"input": "Q?"})])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable record"):
        load_problems(path, "svamp")
    empty = _write(tmp_path / "blank.jsonl", [""])
    with pytest.raises(ValueError, match="no usable record"):
        load_problems(empty, "svamp")


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="task"):
        load_problems(tmp_path, "math")
    with pytest.raises(ValueError, match="limit"):
        load_problems(tmp_path, "gsm8k", limit=0)


def test_hub_id_goes_through_datasets_with_main_config(monkeypatch) -> None:
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(
            [{"question": "A?", "answer": "1 + 1 = 2\n#### 2"}, {"question": "B?", "answer": "no final line"}]
        )

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    with pytest.warns(UserWarning, match=r"openai/gsm8k\[1\]"):
        problems = load_problems("openai/gsm8k", "gsm8k")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [(p.index, p.answer) for p in problems] == [(0, 2.0)]
    assert problems.sha256 is None and problems.split == "test"


def test_unreachable_hub_id_is_a_clear_error(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="neither an existing path nor a loadable hub dataset"):
        load_problems("nobody/no-such-set", "jsonl")
