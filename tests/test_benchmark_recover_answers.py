"""`benchmarks.recover_answers` on a tiny model: a recover row's final answers under a longer cap, its model rebuilt."""

from __future__ import annotations

import json
import shutil

import pytest

import benchmarks.common as common
import benchmarks.recover as recover
import benchmarks.recover_answers as recover_answers
import benchmarks.render as render


def test_same_model_needs_every_rounds_teacher_forced_metrics_equal():
    rounds = [{"round": r, "metrics": {"val/kl_to_dense": 0.1 * r, "val/cot_nll": 1.0 + r}} for r in (0, 1)]
    assert recover_answers.same_model(rounds, json.loads(json.dumps(rounds)))[0]
    moved = [rounds[0], {"round": 1, "metrics": {"val/kl_to_dense": 0.1001, "val/cot_nll": 2.0}}]
    equal, pairs = recover_answers.same_model(rounds, moved)
    assert not equal and pairs[1]["val/kl_to_dense"] == [0.1, 0.1001]
    assert not recover_answers.same_model(rounds, rounds[:1])[0]  # a round missing
    assert not recover_answers.same_model(rounds, [{"round": r["round"], "metrics": {}} for r in rounds])[0]


def test_a_rebuilt_model_finishes_the_cut_answers_and_renders(bench_env, monkeypatch):
    from test_train_cli import write_config

    monkeypatch.setattr(recover, "CONFIG", str(write_config(bench_env)))
    monkeypatch.setattr(recover, "WORK", bench_env / "work")
    monkeypatch.setitem(recover.PRESETS, "tiny", ["--pruning.rounds=1", "--data.val_limit=2", "--data.ood_limit=2"])  # 4-token cap
    monkeypatch.setitem(recover.BASELINES, "tiny-kd", ("tiny",))  # a KD preset paired with its gold-CE one
    common.write_row("recover", recover.row_id("magnitude", "tiny"), recover.run_row("magnitude", "tiny", threads=1))
    recover.keep_generations("magnitude", "tiny")
    with pytest.raises(ValueError, match="must exceed the row's own answer cap"):
        recover_answers.answers_row("magnitude", "tiny", 4, None, threads=1, batch_size=2)
    shutil.rmtree(recover.run_dir("magnitude", "tiny") / "model")  # a fresh machine: the export is rebuilt
    record, answers = recover_answers.answers_row("magnitude", "tiny", 12, None, threads=1, batch_size=2, controls=1)
    assert record["same_model"] and record["base_cap"] == 4 and record["cap"] == 12
    assert (recover.run_dir("magnitude", "tiny") / "model").is_dir()
    for task in ("gsm8k", "ood"):
        part = record[task]
        cut_before = sum(part["cut_at_4"])
        assert len(part["correct"]) == len(part["correct_at_4"]) == 2 and cut_before > 0
        assert part["cut_regenerated"] == cut_before and part["cut_same_start"] <= cut_before
        assert part["controls"] == min(1, 2 - cut_before)
    regenerated = [a for a in answers if a["regenerated"] and a["was_cut"]]
    assert regenerated and all(a["tokens"] <= 12 for a in answers) and max(a["tokens"] for a in regenerated) > 4
    more, extended = recover_answers.answers_row("magnitude", "tiny", None, 4, threads=1, batch_size=2, controls=4)
    for task in ("gsm8k", "ood"):  # the row's 2 answers (re-checked as controls when finished), then 2 new ones
        part, kept = more[task], [a for a in answers if a["task"] == task]
        assert part["new"] == 2 and part["indices"][:2] == [a["index"] for a in kept] and len(part["correct"]) == 4
        assert part["cut_regenerated"] == 0 and part["controls"] == 2 - sum(part["cut_at_4"])
        assert all(a["tokens"] <= 4 for a in extended)
    with pytest.raises(ValueError, match="must exceed the row's own"):
        recover_answers.answers_row("magnitude", "tiny", None, 2, threads=1, batch_size=2)
    folder = bench_env / "results" / "recover_t12"
    folder.mkdir()
    common.write_row("recover_t12", recover.row_id("magnitude", "tiny"), record)
    (folder / f"{recover.row_id('magnitude', 'tiny')}.generations.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    kd = {**record, "preset": "tiny-kd"}  # the same answers, so every gap is exactly 0
    common.write_row("recover_t12", recover.row_id("magnitude", "tiny-kd"), kd)
    common.write_row("recover_q4", recover.row_id("magnitude", "tiny"), more)
    common.write_row("recover_q4", recover.row_id("magnitude", "tiny-kd"), {**more, "preset": "tiny-kd"})
    flipped = {t: {**more[t], "correct": [not c for c in more[t]["correct"]]} for t in ("gsm8k", "ood")}
    common.write_row("recover_q4", recover.row_id("rku", "tiny"), {**more, **flipped, "method": "rku"})  # every answer differs
    text = render.render().read_text()
    questions = text.split("## More questions", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in questions.splitlines() if x.startswith("| qwen0.5b-magnitude-tiny |"))
    assert f"| {sum(more['gsm8k']['correct'])}/4 [" in line and line.endswith(f"| {more['gsm8k']['controls_unchanged'] + more['ood']['controls_unchanged']} of {more['gsm8k']['controls'] + more['ood']['controls']} |")
    pair = next(line for line in questions.splitlines() if line.startswith("| `tiny-kd` − `tiny` (magnitude) |"))
    # per task, then both, then GSM8K after the first PICKED_ON questions (none of 4)
    assert pair.count("of 4: +0 [+0, +0]") == 2 and pair.endswith("of 8: +0 [+0, +0] | — |")
    solved = sum(more["gsm8k"]["correct"] + more["ood"]["correct"])
    pair = next(line for line in questions.splitlines() if line.startswith("| magnitude − rku (`tiny`) |"))
    assert f"| {solved} vs {8 - solved} of 8: {2 * solved - 8:+d} [" in pair  # both tasks: every answer paired with its flip
    assert not any(line.startswith("| rku − rku") for line in questions.splitlines())
    # Equal answers: no gap, so no question count would resolve one.
    assert "| `tiny-kd` − `tiny` (magnitude) | 8 | +0 | 0 | — |" in questions
    section = text.split("## Answer cap", 1)[1].split("\n## ", 1)[0]
    assert f"| qwen0.5b-magnitude-tiny | 4 → 12 | {sum(record['gsm8k']['correct_at_4'])} → {sum(record['gsm8k']['correct'])} of 2 |" in section
    pair = next(line for line in section.splitlines() if line.startswith("| `tiny-kd` − `tiny` (magnitude) |"))
    assert pair.count("of 4: +0 [+0, +0]") == 2  # the same answers twice, both tasks together
    assert "qwen0.5b-magnitude-tiny round 1 (t12) | gsm8k | 30% | 12 |" in text  # its answers in "Why the answers are wrong"
