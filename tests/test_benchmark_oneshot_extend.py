"""`benchmarks.oneshot --extend-from`: a row on more questions keeps its answers on fewer and answers only the rest,
and ends as one pass over all the questions would (tiny model)."""

from __future__ import annotations

import json

import pytest

import benchmarks.common as common
import benchmarks.oneshot as oneshot
from benchmarks.oneshot import Row, Settings, run_row

ROW = "tiny-rku-uniform-30"
FEW = dict(calib_samples=2, calib_max_length=700, gsm8k_limit=4, svamp_limit=4, max_new_tokens=6, batch_size=2, kl=False)


def _main(**settings) -> dict:
    """Run the row's command line with these settings (plus `extend_from`) and return the row it wrote."""
    extend = settings.pop("extend_from", None)
    full = Settings(**settings)
    oneshot.main(["--row", ROW, *oneshot.settings_flags(full), *(["--extend-from", extend] if extend else [])])
    return json.loads(common.row_path(full.stage, ROW).read_text())


def _answers(stage: str) -> list[dict]:
    path = common.row_path(stage, ROW).with_suffix(".predictions.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _base() -> str:
    """The row on 4 + 4 questions, written where `--extend-from` finds it; returns its stage."""
    _main(**FEW)
    return Settings(**FEW).stage


def test_an_extended_row_equals_one_pass_over_all_its_questions(bench_env):
    more = {**FEW, "gsm8k_limit": 8, "svamp_limit": 6}
    stage = _base()
    extended = _main(**more, extend_from=stage)
    assert extended["extended"]["from"] == stage and extended["extended"]["same_model"] is True
    # The first batch of kept answers is regenerated as controls; the other kept ones are reused.
    for name, total in (("gsm8k", 8), ("svamp", 6)):
        assert extended["extended"][name] == {"reused": 2, "controls": 2, "controls_unchanged": 2}
        assert len(extended[f"{name}_correct"]) == total
    one_pass = run_row(Row.parse(ROW), Settings(**more))
    assert extended["gsm8k_correct"] == one_pass["gsm8k_correct"] and extended["svamp_correct"] == one_pass["svamp_correct"]
    assert extended["gsm8k_nll"] == pytest.approx(one_pass["gsm8k_nll"])
    for key in ("accuracy", "mean_tokens", "cot_nll", "truncated_rate"):
        assert extended["gsm8k"][key] == pytest.approx(one_pass["gsm8k"][key], nan_ok=True), key
    assert extended["svamp"]["accuracy"] == pytest.approx(one_pass["svamp"]["accuracy"])
    kept = _answers(Settings(**more).stage)
    for name in ("gsm8k", "svamp"):
        mine = [(a["index"], a["prediction"]) for a in kept if a["set"] == name]
        assert mine == [(p["index"], p["prediction"]) for p in one_pass["predictions"][name]]
    assert all("cot_nll_sum" in a for a in kept if a["set"] == "gsm8k")  # every GSM8K answer carries its NLL


def test_a_changed_control_or_model_regenerates_every_answer(bench_env):
    stage = _base()
    path = common.row_path(stage, ROW).with_suffix(".predictions.jsonl")
    answers = _answers(stage)
    first_svamp = next(a for a in answers if a["set"] == "svamp")
    first_svamp["prediction"] += " (edited)"  # a control that will not come back unchanged
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    more = {**FEW, "gsm8k_limit": 6, "svamp_limit": 6}
    extended = _main(**more, extend_from=stage)["extended"]
    assert extended["gsm8k"]["reused"] == 2 and extended["svamp"] == {"reused": 0, "controls": 2, "controls_unchanged": 1}
    assert not any(a["prediction"].endswith("(edited)") for a in _answers(Settings(**more).stage))

    answers = _answers(stage)
    next(a for a in answers if a["set"] == "gsm8k")["cot_nll_sum"] += 1.0  # scores of another model
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    common.row_path(Settings(**more).stage, ROW).unlink()
    extended = _main(**more, extend_from=stage)["extended"]
    assert extended["same_model"] is False
    assert oneshot._same_scores([{"index": 0, "cot_nll_sum": 1.0}], {0: {"prediction": "x"}}) is False  # no scores kept
    assert all(extended[name] == {"reused": 0, "controls": 0, "controls_unchanged": 0} for name in ("gsm8k", "svamp"))


@pytest.mark.parametrize(("base", "change", "message"), [
    ({}, {"max_new_tokens": 8}, "other settings"),
    ({}, {"gsm8k_limit": 3}, "at most this row's"),
    ({"gsm8k_limit": 3}, {}, "whole batches"),  # the new questions would not be batched as in one pass
])
def test_a_base_row_that_cannot_be_extended_fails_before_compute(bench_env, base, change, message, monkeypatch):
    _main(**{**FEW, **base})
    stage = Settings(**{**FEW, **base}).stage
    monkeypatch.setattr(oneshot, "load_causal_lm", lambda *_: pytest.fail("loaded a model before checking the base row"))
    with pytest.raises(ValueError, match=message):
        run_row(Row.parse(ROW), Settings(**{**FEW, "gsm8k_limit": 8, **change}), extend_from=stage)
    with pytest.raises(FileNotFoundError, match="--extend-from oneshot_q2: no row"):
        run_row(Row.parse(ROW), Settings(**FEW), extend_from="oneshot_q2")
