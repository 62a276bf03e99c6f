"""Benchmark plumbing on a tiny model: a one-shot row runs end to end, is resumable, and renders."""

from __future__ import annotations

import argparse
import json
import os
import re

import pytest

import benchmarks.answers as answers_module
import benchmarks.common as common
import benchmarks.oneshot as oneshot
import benchmarks.recover as recover
import benchmarks.render as render
from benchmarks.oneshot import Row, Settings, grid, run_row
from benchmarks.render import bootstrap_interval, nll_interval, paired_gap, paired_nll_gap


def test_methods_choose_and_order_the_rows():
    from benchmarks.run import _ordered_rows

    args = argparse.Namespace(models=["qwen0.5b"], sparsities=[0.4], allocations=["global"], methods=["magnitude", "dense", "rku"])
    assert [r.row_id for r in _ordered_rows(args)] == ["qwen0.5b-magnitude-global-40", "qwen0.5b-dense", "qwen0.5b-rku-global-40"]


def test_row_ids_round_trip_and_grid_covers_every_method():
    rows = grid(["qwen0.5b", "smollm2"], [0.2, 0.4], ["global", "uniform"])
    assert len(rows) == 2 + 2 * 2 * 2 * len(oneshot.METHODS)
    assert all(Row.parse(r.row_id) == r for r in rows)
    assert Row.parse("qwen0.5b-rku_hidden-uniform-30") == Row("qwen0.5b", "rku", "hidden", "uniform", 0.3)
    assert Row.parse("qwen0.5b-wanda_sp_qheads-global-40") == Row("qwen0.5b", "wanda_sp", "ce", "global", 0.4, "query_heads")
    assert Row.parse("qwen0.5b-rku_mlp-global-40") == Row("qwen0.5b", "rku", "ce", "global", 0.4, "none")


def test_oneshot_rows_run_cache_statistics_and_render(bench_env):
    settings = Settings(calib_samples=2, calib_max_length=700, gsm8k_limit=3, svamp_limit=2, max_new_tokens=4, batch_size=2)
    records = {}
    for row in [Row("tiny", None), Row("tiny", "rku", sparsity=0.3), Row("tiny", "flap", sparsity=0.3)]:
        record = run_row(row, settings)
        record.pop("predictions")
        common.write_row("oneshot", row.row_id, record)
        records[row.row_id] = record
    rku = records["tiny-rku-global-30"]
    assert abs(rku["report"]["sparsity"] - 0.3) < 0.012 and rku["params"] < records["tiny-dense"]["params"]
    assert "calibrate_s" in rku["timings"] and records["tiny-flap-global-30"]["timings"]["calibration"] == "cached"
    assert len(rku["gsm8k_correct"]) == 3 and len(rku["svamp_correct"]) == 2
    assert [len(v) for v in rku["gsm8k_nll"].values()] == [3] * 4
    assert rku["gsm8k"]["cot_nll"] > 0 and len(rku["data"]["gsm8k_test"]["sha256"]) == 64
    gold_kl = rku["gsm8k_kl"]["kl_to_dense_gold"]  # per question, for paired intervals; its mean is the row's
    assert gold_kl["index"] == rku["gsm8k_indices"] and sum(gold_kl["kl_sum"]) / sum(gold_kl["tokens"]) == pytest.approx(
        rku["gsm8k"]["kl_to_dense_gold"])
    saved = json.loads(common.row_path("oneshot", "tiny-rku-global-30").read_text())
    assert saved["commit"] and saved["command"] and saved["environment"]["threads"] >= 1
    assert common.is_done("oneshot", "tiny-rku-global-30")
    more = Settings(calib_samples=3, calib_max_length=700, gsm8k_limit=3, generate=False)
    common.write_row(more.stage, "tiny-rku-global-30", run_row(Row("tiny", "rku", sparsity=0.3), more))
    text = render.render().read_text()
    # The same row with a larger calibration sample gets its own table and a paired comparison.
    assert "3 calibration problems" in text and "| 2 problems | 3 problems |" in text
    larger = text.split("3 calibration problems", 1)[1].split("\n#", 1)[0]
    assert "| dense |" in larger  # the dense row needs no calibration: it heads that table too
    compared = next(line for line in text.splitlines() if line.startswith("| tiny | global | 30% | rku | 3 |"))
    assert re.search(r"\| \d+\.\d{3} \| \d+\.\d{3} \([+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]\) \|$", compared), compared
    for method in ("rku", "flap"):
        assert re.search(rf"\| global \| (29|30)\.\d% \| {method} \|", text), method
    assert "| dense |" in text
    flap = next(line for line in text.splitlines() if "| flap |" in line)
    assert re.search(r"\| \d+\.\d{3} \[\d+\.\d\d, \d+\.\d\d\] \|", flap), flap  # NLL with its interval
    assert re.search(r"\| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] \|$", flap), flap  # paired gap to RKU
    acc_gap = r"[+-]\d+\.\d% \[[+-]\d+%, [+-]\d+%\]"
    assert re.search(rf"\| {acc_gap} \| {acc_gap} \| {acc_gap} \| [^|]+ \|$", flap), flap  # GSM8K, SVAMP, both: gaps to RKU
    assert (bench_env / "results" / "oneshot_sparsity_tiny.png").stat().st_size > 1000


def test_settings_survive_the_command_line_and_nll_only_rows_skip_generation(bench_env):
    parser = argparse.ArgumentParser()
    oneshot.add_settings_arguments(parser)
    settings = Settings(generate=False, threads=2, gsm8k_limit=2, calib_samples=2, calib_max_length=700)
    assert oneshot.settings_from(parser.parse_args(oneshot.settings_flags(settings))) == settings
    assert settings.stage == "oneshot_nll_q2_c2_L700" and Settings().stage == "oneshot"
    assert Settings(generate=False).stage == "oneshot_nll" and Settings(gsm8k_limit=200).stage == "oneshot_q200"
    assert Settings(calib_samples=64, generate=False).stage == "oneshot_nll_c64"
    # Another answer cap is another measurement: its own folder, and self traces of its own length.
    assert Settings(max_new_tokens=512, calib_source="self").stage == "oneshot_t512_self"
    assert Settings(calib_max_length=640, generate=False, calib_source="self").stage == "oneshot_nll_L640_self"
    assert Settings(gsm8k_limit=64, calib_max_length=640, calib_source="self", seed=1).stage == "oneshot_q64_L640_self_s1"
    paths = {oneshot._stats_path("m", "ce", Settings(max_new_tokens=n, calib_source=src)).name
             for n in (256, 512) for src in ("gold", "self")}
    assert paths == {"m-ce-n16-L256-s0.pt", "m-ce-n16-L256-s0-self.pt", "m-ce-n16-L256-s0-self-T512.pt"}
    record = run_row(Row("tiny", "magnitude", sparsity=0.3), settings)
    assert record["gsm8k"]["cot_nll"] > 0 and "accuracy" not in record["gsm8k"]
    assert record["gsm8k_correct"] == [] and record["svamp"] == {}


def test_bootstrap_intervals_cover_the_mean_and_pair_questions():
    flags = [True] * 30 + [False] * 70
    low, high = bootstrap_interval(flags)
    assert low < 0.3 < high and high - low < 0.25
    mean, low, high = paired_gap(flags, flags)
    assert mean == low == high == 0
    mean, low, high = paired_gap([True] * 50, [False] * 50)
    assert mean == low == high == 1
    with pytest.raises(ValueError, match="equally long"):
        paired_gap([True], [True, False])


def test_questions_needed_agrees_with_the_paired_bootstrap():
    """Below the count it names, the same gap per question is not resolved by the paired bootstrap; at it, it is."""
    a, b = [True, True] + [False] * 8, [False] * 10  # 2 more solved of 10
    needed = render.questions_needed(a, b)
    assert needed == 18 and render.questions_needed(a, a) is None
    assert paired_gap(a, b)[1] <= 0  # 10 questions: the interval holds zero
    assert paired_gap(a * 2, b * 2)[1] > 0  # 20 (>= 18) with the same gap per question: resolved
    assert render.questions_needed(b, a) == needed  # the sign of the gap does not matter


def test_nll_intervals_resample_questions_and_pair_them():
    a = {"cot_nll_sum": [float(10 + i % 7) for i in range(40)], "cot_tokens": [10.0] * 40}
    low, high = nll_interval(a)
    pooled = sum(a["cot_nll_sum"]) / sum(a["cot_tokens"])
    assert low < pooled < high and high - low < 0.5
    assert paired_nll_gap(a, a) == (0.0, 0.0, 0.0)
    shifted = {"cot_nll_sum": [v + 5.0 for v in a["cot_nll_sum"]], "cot_tokens": a["cot_tokens"]}
    mean, low, high = paired_nll_gap(shifted, a)  # a constant per-question shift has no paired noise
    assert mean == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same"):
        paired_nll_gap(a, {"cot_nll_sum": [1.0], "cot_tokens": [1.0]})


@pytest.mark.slow
def test_recover_row_runs_train_py_and_renders_every_round(bench_env, monkeypatch):
    from test_train_cli import write_config

    monkeypatch.setattr(recover, "CONFIG", str(write_config(bench_env)))
    monkeypatch.setattr(recover, "WORK", bench_env / "work")
    monkeypatch.setitem(recover.PRESETS, "tiny", ["--model.generate=false", "--pruning.rounds=1"])
    record = recover.run_row("magnitude", "tiny", threads=1)
    rounds = record["report"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["sparsity"] == pytest.approx(0.3, abs=0.03)
    expected = {"val/cot_nll", "val/cot_nll_reasoning", "val/cot_nll_other", "val/kl_to_dense", "val/kl_to_dense_gold"}
    assert all(set(r["metrics"]) == expected for r in rounds)
    assert "--pruning.importance=magnitude" in record["train_command"] and record["overrides"][-1] == "--pruning.rounds=1"
    final = record["final"]  # the exported model, scored like the one-shot rows
    assert final["gsm8k"]["cot_nll"] > 0 and len(final["gsm8k_nll"]["cot_tokens"]) == len(final["gsm8k_indices"]) == 32
    common.write_row("recover", "tiny-magnitude-tiny", record)
    # An RKU run of another preset that logged accuracy and was resumed: compared only within its preset.
    accuracy = [{**x, "metrics": {**x["metrics"], "val/gsm8k_acc": 0.5}} for x in rounds]
    other = {**record, "method": "rku", "preset": "other", "report": {**record["report"], "rounds": accuracy},
             "resumed_from": {"checkpoint": "round-end.ckpt", "rounds_done": 1}, "compute_s": 120.0}
    common.write_row("recover", "tiny-rku-other", other)
    text = render.render().read_text()
    assert "**tiny-magnitude-tiny**" in text and text.count("| 0 | 0.000 | 0.000 |") == 2
    assert "2 min over several sittings, resumed after round 1" in text and text.count("Preset `") == 2
    tiny = text.split("Preset `tiny`", 1)[1].split("Preset `other`", 1)[0]
    assert re.search(r"\| tiny-magnitude-tiny \| (29|30)\.\d% \| [\d,]+ \| \d+\.\d{3} \[.*\|\s+\|$", tiny, re.M)  # no RKU run to pair
    assert (bench_env / "results" / "recover_rounds.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_recover_row_resumes_an_interrupted_run(bench_env, monkeypatch):
    import subprocess

    from test_train_cli import write_config

    monkeypatch.setattr(recover, "CONFIG", str(write_config(bench_env)))
    monkeypatch.setattr(recover, "WORK", bench_env / "work")
    monkeypatch.setitem(recover.PRESETS, "tiny", ["--model.generate=false", "--pruning.rounds=2"])
    assert recover.latest_checkpoint("magnitude", "tiny") is None
    # The first sitting is killed in round 2 of 2 (SIGTERM, as a session's end or a scheduler would),
    # leaving round 1's round-end checkpoint and no export.
    stop = ["--trainer.callbacks+=test_train_cli.SigtermInRoundTwo"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(recover.ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run(recover.train_command("magnitude", "tiny", stop), cwd=recover.ROOT, capture_output=True, env=env)
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert recover.latest_checkpoint("magnitude", "tiny") is not None
    assert not (recover.run_dir("magnitude", "tiny") / "model").exists()

    record = recover.run_row("magnitude", "tiny", threads=1)
    assert record["resumed_from"]["rounds_done"] == 1 and "--ckpt_path=" in record["train_command"]
    assert not any(o.startswith("--ckpt_path") for o in record["overrides"])
    rounds = record["report"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["sparsity"] == pytest.approx(0.3, abs=0.03)
    assert record["compute_s"] == pytest.approx(sum(v for r in rounds for k, v in r.items() if k.startswith("time_")), abs=0.1)
    assert record["final"]["gsm8k"]["cot_nll"] > 0


def test_recover_keeps_every_rounds_answers_beside_the_row(bench_env, monkeypatch):
    monkeypatch.setattr(recover, "WORK", bench_env / "work")
    assert recover.keep_generations("rku", "cpu") is None  # a run without generation keeps nothing
    folder = recover.run_dir("rku", "cpu") / "generations"
    folder.mkdir(parents=True)
    for round_index in (10, 2, 0):  # numeric order, not text order
        answers = [{"task": "gsm8k", "index": i, "correct": i == round_index % 2} for i in range(2)]
        (folder / f"round-{round_index}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    path = recover.keep_generations("rku", "cpu")
    assert path == common.row_path("recover", "qwen0.5b-rku-cpu").with_suffix(".generations.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["round"], r["index"]) for r in rows] == [(0, 0), (0, 1), (2, 0), (2, 1), (10, 0), (10, 1)]
    assert [r["correct"] for r in rows] == [True, False] * 3
    assert common.load_rows("recover") == []  # answers are not rows


def test_recover_accuracy_is_paired_per_question_within_a_preset_and_with_its_baseline(bench_env, monkeypatch):
    folder = bench_env / "results" / "recover"
    folder.mkdir(parents=True)
    solved = {"rku": {0, 1}, "flap": {0, 2, 3}, "other": {0}}  # GSM8K questions 0-3 solved in round 1
    ood = {"rku": {0}, "flap": {0, 1}}  # OOD questions 0-1; `other` answered none
    for name, hits in solved.items():
        answers = [{"round": 1, "task": "gsm8k", "index": i, "correct": i in hits} for i in range(4)]
        answers += [{"round": 1, "task": "ood", "index": i, "correct": i in ood[name]} for i in range(2) if name in ood]
        (folder / f"{name}.generations.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    rows = [{"row_id": "rku", "method": "rku", "preset": "p"}, {"row_id": "flap", "method": "flap", "preset": "p"},
            {"row_id": "other", "method": "flap", "preset": "q"}, {"row_id": "none", "method": "rku", "preset": "p"}]
    monkeypatch.setattr(render, "BASELINES", {"q": ("absent", "p")})  # `q` is compared with `p`, no run in `absent`
    table = render._recover_answers_table(rows)
    flap = next(line for line in table if line.startswith("| flap |"))
    cells = flap.split(" | ")
    assert flap.startswith("| flap | 1 | 3/4 [") and cells[3].startswith("+1 [")  # 3 vs 2 solved
    assert cells[5].startswith("2/2 [") and cells[6].startswith("+1 [") and cells[8].startswith("+2 [")  # 5 vs 3 of 6
    other = next(line for line in table if line.startswith("| other |")).split(" | ")
    assert other[3] == "" and other[4].startswith("-2 [")  # no RKU run in `q`; 1 vs flap's 3 in its baseline `p`
    assert other[4].endswith("(`p`)") and other[5] == "—" and other[8] == ""
    assert other[9] == " |"  # both tasks: flap answered OOD questions `other` did not, so nothing to pair
    assert not any(line.startswith("| none |") for line in table)  # a run without kept answers


def test_recovered_layer_widths_are_drawn_only_for_presets_that_do_not_keep_every_layer_alike(tmp_path):
    def row(method: str, preset: str, kept: list[int]) -> dict:
        layers = [{"layer": i, "mlp_channels": k, "mlp_channels_total": 8} for i, k in enumerate(kept)]
        return {"method": method, "preset": preset, "report": {"rounds": [{"layers": []}, {"layers": layers}]}}

    rows = [row("rku", "g", [8, 4, 2]), row("flap", "g", [2, 4, 8]), row("rku", "u", [4, 4, 4])]
    assert render.recover_layer_profiles(rows) == {"g": {"rku": [1.0, 0.5, 0.25], "flap": [0.25, 0.5, 1.0]}}
    lines = render.recover_layers_section(rows, tmp_path / "layers.png")
    assert (tmp_path / "layers.png").stat().st_size > 0 and "(results/layers.png)" in lines[2]
    assert render.recover_layers_section(rows[2:], tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()


def test_the_rounds_plot_has_a_row_per_preset_with_its_seeds_together(tmp_path):
    def row(method: str, preset: str) -> dict:
        rounds = [{"sparsity": s, "metrics": {"val/cot_nll": 1.0 + s}} for s in (0.2, 0.4)]
        return {"method": method, "preset": preset, "report": {"rounds": rounds}}

    rows = [row("rku", "u"), row("flap", "u-seed1"), row("rku", "u-seed1"), row("rku", "g"), row("flap", "u-30")]
    groups = render.recover_plot_groups(rows)
    assert list(groups) == ["u", "g", "u-30"] and [r["preset"] for r in groups["u"]] == ["u", "u-seed1", "u-seed1"]
    render._plot_recover_rounds(rows, ["val/cot_nll"], tmp_path / "rounds.png")
    import matplotlib.image

    height, width = matplotlib.image.imread(tmp_path / "rounds.png").shape[:2]
    assert height > 1.5 * width  # three rows of one panel each (one row would be wider than tall)


def test_a_preset_that_changes_only_what_is_pruned_is_paired_with_every_run_of_its_reference(monkeypatch):
    """The global MLP-only KD run against the uniform KD runs of RKU and FLAP, on the same questions only."""
    monkeypatch.setattr(render, "REFERENCES", {"g": "u"})

    def row(method: str, preset: str, gsm8k: list[int], ood: list[int], first: int = 0) -> dict:
        tasks = {t: {"correct": [bool(x) for x in c], "indices": list(range(first, first + len(c))), "controls": 1,
                     "controls_unchanged": 1} for t, c in (("gsm8k", gsm8k), ("ood", ood))}
        return {"row_id": f"{method}-{preset}", "method": method, "preset": preset, "cap": 256, **tasks}

    rows = [row("rku", "u", [1, 0, 0, 0], [1, 0]), row("flap", "u", [1, 1, 0, 0], [0, 0]),
            row("kinetic", "g", [1, 1, 1, 0], [1, 1]), row("rku", "x", [1, 1, 1, 1], [1, 1], first=4)]
    lines = render.questions_section(rows, oneshot=[])
    pairs = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in lines if " vs " in line}
    assert set(pairs) == {"kinetic (`g`) − rku (`u`)", "kinetic (`g`) − flap (`u`)", "flap − rku (`u`)"}
    assert pairs["kinetic (`g`) − rku (`u`)"][0].startswith("3 vs 1 of 4: +2 [")
    assert pairs["kinetic (`g`) − flap (`u`)"][2].startswith("5 vs 2 of 6: +3 [")  # both tasks together
    assert pairs["kinetic (`g`) − flap (`u`)"][3] == "— |"  # no question after the first PICKED_ON (64)
    monkeypatch.setattr(render, "PICKED_ON", 2)  # GSM8K questions 2 and 3: kinetic 1 and 0, FLAP 0 and 0
    fresh = {x.split(" | ")[0]: x.split(" | ")[4] for x in render.questions_section(rows, oneshot=[]) if " vs " in x}
    assert fresh["| kinetic (`g`) − flap (`u`)"].startswith("1 vs 0 of 2: +1 [")
    assert render._rku_run(rows, rows[2]) is rows[0] and render._rku_run(rows, rows[0]) is None
    own = row("rku", "g", [0, 0, 0, 0], [0, 0])  # an RKU run of its own preset comes first, wherever it is listed
    assert render._rku_run([*rows, own], rows[2]) is own
    # Within one preset each run pairs with its RKU and FLAP runs, and each pair is shown once.
    flap = row("flap", "g", [0, 1, 0, 0], [1, 0])
    lines = render.questions_section([*rows, own, flap], oneshot=[])
    within = {line.split(" | ")[0].removeprefix("| ") for line in lines if " vs " in line and "(`g`)" in line and "`u`" not in line}
    assert within == {"kinetic − rku (`g`)", "kinetic − flap (`g`)", "flap − rku (`g`)"}


def test_a_recovered_row_is_set_against_the_dense_answers_it_keeps_and_the_ones_it_gains():
    """Same accuracy as dense can hide answers lost and gained: the table counts both, on the dense row's questions."""
    tasks = {t: {"correct": c, "indices": [2, 3, 4, 5], "controls": 1, "controls_unchanged": 1}
             for t, c in (("gsm8k", [True, True, False, True]), ("ood", [False] * 4))}
    recovered = {"row_id": "rku-u", "method": "rku", "preset": "u", "cap": 256, **tasks}
    dense = {"row_id": "qwen-dense", "settings": {"max_new_tokens": 256}, "gsm8k_indices": [0, 1, 2, 3, 4, 5],
             "gsm8k_correct": [1, 1, 0, 1, 1, 1], "svamp_indices": [2, 3, 4, 5], "svamp_correct": [1, 0, 0, 0]}
    (line,) = [x for x in render.questions_section([recovered], oneshot=[dense]) if x.startswith("| rku-u |")]
    cells = line.split(" | ")
    assert cells[2] == "3/4" and cells[3].startswith("+0 [") and cells[4:6] == ["100%", "2 / 1"]  # dense: 3, 4, 5; row: 2, 3, 5
    assert cells[7] == "1/4" and cells[8].startswith("-1 [")  # OOD: no kept / new column


def test_every_kd_run_is_set_against_its_gold_ce_baseline_and_the_gaps_are_summed_per_method_and_over_all(monkeypatch):
    monkeypatch.setattr(render, "BASELINES", {"kd": ("ce",), "kd-20": ("ce-20",)})

    def row(method: str, preset: str, gsm8k: list[int], ood: list[int], first: int = 0) -> dict:
        tasks = {t: {"correct": [bool(x) for x in c], "indices": list(range(first, first + len(c)))}
                 for t, c in (("gsm8k", gsm8k), ("ood", ood))}
        return {"row_id": f"{method}-{preset}", "method": method, "preset": preset, "cap": 256, **tasks}

    rows = [row("rku", "kd", [1, 1, 0], [1, 0]), row("rku", "ce", [0, 1, 0], [0, 0]),  # +1 GSM8K, +1 OOD
            row("rku", "kd-20", [0, 0, 0], [1, 1]), row("rku", "ce-20", [1, 0, 0], [1, 1]),  # -1 GSM8K
            row("flap", "kd", [1, 1, 1], [0, 0]), row("flap", "ce", [0, 0, 0], [0, 0]),  # +3 GSM8K
            row("flap", "kd-20", [1], [1], first=9), row("flap", "ce-20", [0], [0])]  # other questions: not paired
    assert render.recovery_loss_section(rows[:2]) == []  # one pair: nothing to sum
    shorter = [row("rku", "kd", [1, 1], [1]), row("rku", "ce", [0, 1], [0])]  # its first questions again: not summed twice
    assert render.recovery_loss_section(shorter + rows) == render.recovery_loss_section(rows)
    table = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in render.recovery_loss_section(rows)
             if line.startswith(("| rku", "| flap", "| all"))}
    assert table["rku"][0] == "`kd`, `kd-20`" and [c.split(" [")[0] for c in table["rku"][1:]] == ["+0", "+1", "+1"]
    assert table["flap"][0] == "`kd`" and table["flap"][1].startswith("+3 [")
    assert table["all"][0] == "3 pairs" and [c.split(" [")[0] for c in table["all"][1:]] == ["+3", "+1", "+4"]


def test_a_preset_paired_with_a_reference_preset_changes_one_thing_from_it():
    """RESULTS.md reads a gap to the reference preset's runs as the effect of one change: what is pruned (the
    allocation, or the text the scores are calibrated on), which traces are kept (with the questions it takes to keep
    enough) or the recovery budget (for KD with the dense traces its steps take), never two and never anything else."""
    which_traces = {"--data.trace_keep", "--data.trace_samples", "--data.calibration_samples"}
    one_thing = ({"--pruning.allocation", "--pruning.attention"}, {"--data.calibration_source"}, which_traces,
                 {"--pruning.recovery_steps"}, {"--pruning.recovery_steps", "--data.trace_samples"})
    for preset, reference in recover.REFERENCES.items():
        changed = {o.split("=", 1)[0] for o in set(recover.PRESETS[preset]) ^ set(recover.PRESETS[reference])}
        assert changed in one_thing, (preset, reference, changed)
    for preset, options in (("cpu-uniform-L640-steps48", {"--pruning.recovery_steps=48"}),
                            ("cpu-uniform-kd-self-L640-steps32", {"--pruning.recovery_steps=32", "--data.trace_samples=128"}),
                            ("cpu-uniform-kd-current-L640", {"--data.calibration_source=current"}),
                            ("cpu-uniform-kd-gold-calibration-L640", {"--data.calibration_source=gold"}),
                            ("cpu-uniform-kd-mixed-calibration-L640", {"--data.calibration_source=mixed"}),
                            ("cpu-uniform-kd-correct-L640", {"--data.trace_keep=correct", "--data.trace_samples=160",
                                                             "--data.calibration_samples=160"})):
        assert set(recover.PRESETS[preset]) - set(recover.PRESETS[recover.REFERENCES[preset]]) == options


def test_a_seeded_preset_repeats_its_preset_under_another_seed_and_its_pairs_are_summed_over_seeds(monkeypatch):
    """Seed 1 of the global MLP-only gold-CE run pairs with seed 1 of the uniform runs; both seeds' gaps sum per question."""
    seeded = recover.PRESETS["cpu-global-mlp-L640-seed1"]
    assert seeded[: len(recover.PRESETS["cpu-global-mlp-L640"])] == recover.PRESETS["cpu-global-mlp-L640"]
    assert {"--seed_everything=1", "--pruning.seed=1", "--data.seed=1"} <= set(seeded)
    assert recover.REFERENCES["cpu-global-mlp-L640-seed1"] == "cpu-uniform-L640-seed1"
    # A seeded KD preset is compared with its gold-CE baseline's run under the same seed, and only where that ran seeded
    # (`cpu-uniform`, its second baseline, did not).
    assert recover.BASELINES["cpu-uniform-kd-self-L640-seed1"] == ("cpu-uniform-L640-seed1",)
    assert recover.BASELINES["cpu-uniform-kd-self-L640-20-seed1"] == ("cpu-uniform-L640-20-seed1",)
    assert recover.BASELINES["cpu-global-mlp-kd-self-L640-seed1"] == ("cpu-global-mlp-L640-seed1",)
    assert recover.REFERENCES["cpu-global-mlp-kd-self-L640-seed1"] == "cpu-uniform-kd-self-L640-seed1"
    assert recover.preset_seed("cpu-uniform-L640-seed1") == ("cpu-uniform-L640", 1)
    assert recover.preset_seed("cpu-uniform-L640") == ("cpu-uniform-L640", 0)
    monkeypatch.setattr(render, "REFERENCES", {"g": "u", "g-seed1": "u-seed1"})

    def row(method: str, preset: str, gsm8k: list[int], ood: list[int]) -> dict:
        tasks = {t: {"correct": [bool(x) for x in c], "indices": list(range(len(c)))} for t, c in (("gsm8k", gsm8k), ("ood", ood))}
        return {"row_id": f"{method}-{preset}", "method": method, "preset": preset, "cap": 256, **tasks}

    seed0 = [row("kinetic", "g", [1, 1, 0, 0], [1, 0]), row("flap", "u", [1, 0, 0, 0], [1, 1])]
    seed1 = [row("kinetic", "g-seed1", [1, 1, 1, 0], [0, 0]), row("flap", "u-seed1", [0, 0, 0, 0], [1, 0])]
    assert render.recover_seeds_section(seed0) == []  # one seed: nothing to sum
    lines = render.recover_seeds_section([*seed0, *seed1, row("rku", "u", [1, 1, 1, 1], [1, 1])])
    (line,) = [x for x in lines if x.startswith("| kinetic (`g`) − ")]  # rku − flap and kinetic − rku: seed 0 only
    cells = line.split(" | ")
    assert cells[0] == "| kinetic (`g`) − flap (`u`)" and cells[1] == "4"
    assert cells[2] == "0: 2 vs 1, 1 vs 2; 1: 3 vs 0, 0 vs 1"
    assert cells[3].startswith("+4 [") and cells[4].startswith("-2 [") and cells[5].startswith("+2 [")
    assert cells[6:] == ["—", "— |"]  # no question after the first PICKED_ON (64)
    monkeypatch.setattr(render, "PICKED_ON", 2)  # questions 2 and 3 of GSM8K: seed 0 gaps 0, 0; seed 1 gaps +1, 0
    (line,) = [x for x in render.recover_seeds_section([*seed0, *seed1]) if x.startswith("| kinetic (`g`) − ")]
    assert [c.split(" [")[0] for c in line.split(" | ")[6:]] == ["+1", "+1"]  # OOD has no question from 2 on
    drift = {x.split(" | ")[0]: x.split(" | ")[2:] for x in lines if "seed 1 − seed 0" in x}
    assert set(drift) == {"| kinetic (`g`)", "| flap (`u`)"}  # rku ran under one seed only
    assert drift["| kinetic (`g`)"][0].startswith("3 vs 2 of 4: +1 [") and drift["| flap (`u`)"][2].startswith("1 vs 3 of 6: -2 [")


def test_a_kd_run_and_its_gold_ce_baseline_are_summed_over_seeds(monkeypatch):
    """KD − gold CE of one method is read from both seeds' draws, each seed's KD run with the same seed's CE run."""
    monkeypatch.setattr(render, "REFERENCES", {})
    monkeypatch.setattr(render, "BASELINES", {"kd": ("ce",), "kd-seed1": ("ce-seed1",)})

    def row(preset: str, gsm8k: list[int]) -> dict:
        tasks = {t: {"correct": [bool(x) for x in c], "indices": list(range(len(c)))} for t, c in (("gsm8k", gsm8k), ("ood", [0]))}
        return {"row_id": f"rku-{preset}", "method": "rku", "preset": preset, "cap": 256, **tasks}

    rows = [row("kd", [1, 1, 0]), row("ce", [0, 1, 0]), row("kd-seed1", [1, 0, 0]), row("ce-seed1", [1, 1, 1])]
    (line,) = [x for x in render.recover_seeds_section(rows) if x.startswith("| `kd` − `ce` (rku)")]
    cells = line.split(" | ")
    assert cells[2] == "0: 2 vs 1, 0 vs 0; 1: 1 vs 3, 0 vs 0"
    assert cells[3].startswith("-1 [")  # +1 under seed 0, −2 under seed 1
    assert render.recover_seeds_section(rows[:2]) == []  # one seed: nothing to sum


def test_the_gpu_script_names_only_presets_and_methods_that_exist():
    """The GPU script cannot be tried on this machine and its device time is scarce: a misspelt preset or method
    (which `--methods` of the one-shot stage would select nothing for) must fail here, not there."""
    from rku_lightning.pruning.importance import IMPORTANCES

    script = (common.ROOT / "benchmarks" / "gpu_reasoning.sh").read_text()
    (recovered,) = re.findall(r'^RECOVERED="([^"]+)"', script, re.M)
    rows = [tuple(row.split(":")) for row in recovered.split()]
    presets = {preset for _, preset in rows} | set(re.findall(r"--preset (gpu-[\w-]+)", script))
    assert {"gpu-global-mlp-ce-gold", "gpu-global-mlp-kd-self", "gpu-ce-gold-30"} <= presets <= set(recover.PRESETS)
    assert {method for method, _ in rows} <= set(IMPORTANCES)
    oneshot_runs = re.findall(r"oneshot \$ONESHOT --allocations (\w+) --methods ([\w ]+?) --calib-source", script)
    assert len(oneshot_runs) == 2
    for allocation, methods in oneshot_runs:
        offered = {row.method for row in grid(["qwen0.5b"], [0.4], [allocation])}
        assert set(methods.split()) <= offered, (allocation, methods)


def test_a_row_counts_as_done_only_when_measured_with_the_same_settings(bench_env):
    """A row written before KL to dense existed (no `kl` in its settings) is measured again, not reused."""
    settings = Settings(gsm8k_limit=3, generate=False)
    row = "tiny-rku-uniform-20"
    assert not oneshot.measured_with(settings.stage, row, settings)
    recorded = {k: v for k, v in vars(settings).items() if k not in oneshot.LEGACY_SETTINGS}
    common.write_row(settings.stage, row, {"settings": recorded})
    assert oneshot.measured_with(settings.stage, row, Settings(gsm8k_limit=3, generate=False, kl=False))
    assert not oneshot.measured_with(settings.stage, row, settings)  # kl=True now: measure again
    common.write_row(settings.stage, row, {"settings": vars(settings)})
    assert oneshot.measured_with(settings.stage, row, settings)
    before_split = {"kl_to_dense": {"index": [0], "kl_sum": [1.0], "tokens": [4]}}
    common.write_row(settings.stage, row, {"settings": vars(settings), "gsm8k_kl": before_split})
    assert not oneshot.measured_with(settings.stage, row, settings)  # KL without its token-class split: measure again
    split = {"kl_to_dense": {**before_split["kl_to_dense"], "kl_sum_reasoning": [0.5], "tokens_reasoning": [2]}}
    common.write_row(settings.stage, row, {"settings": vars(settings), "gsm8k_kl": split})
    assert oneshot.measured_with(settings.stage, row, settings)
    assert not oneshot.measured_with(settings.stage, row, Settings(gsm8k_limit=3, generate=False, seed=1))
    assert oneshot.measured_with(settings.stage, row, Settings(gsm8k_limit=3, generate=False, threads=2))


def test_gold_and_self_calibrated_rows_are_paired_with_intervals(bench_env, monkeypatch):
    """The reasoning issue's one-shot comparison: the same row calibrated on gold text and on dense traces."""
    monkeypatch.setenv("RKU_CACHE", str(bench_env / "cache"))
    base = dict(calib_samples=2, calib_max_length=700, gsm8k_limit=3, max_new_tokens=4, batch_size=2, generate=False)
    row = Row("tiny", "rku", allocation="uniform", sparsity=0.3)
    for source in ("gold", "self"):
        settings = Settings(**base, calib_source=source)
        record = run_row(row, settings)
        assert set(record["gsm8k_kl"]) == {"kl_to_dense", "kl_to_dense_gold"} and record["gsm8k"]["kl_to_dense"] > 0
        common.write_row(settings.stage, row.row_id, record)
    text = render.render().read_text()
    section = text.split("## Calibration source", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith("| tiny | uniform | 30% | rku | 3 | 2 (700-token window) |"))
    assert len(re.findall(r"\d+\.\d{3} \([+-]\d+\.\d{3} \[[+-]\d+\.\d{3}, [+-]\d+\.\d{3}\]\)", line)) == 3, line


def test_answer_diagnosis_counts_cut_answers_and_wrong_steps(bench_env):
    """`Why the answers are wrong`: cut answers, accuracy of the finished ones, arithmetic of the written steps."""
    folder = bench_env / "results" / "oneshot_t8"
    folder.mkdir(parents=True)
    (folder / "tiny-rku-uniform-20.json").write_text(json.dumps(
        {"row_id": "tiny-rku-uniform-20", "settings": {"max_new_tokens": 8}, "report": {"sparsity": 0.2}}))
    answers = [("2 + 2 = 4 #### 4", 5, True), ("3 * 3 = 10 #### 10", 6, False), ("1 + 1 = 2 and 2 + 5 = 7 and", 8, False)]
    lines = [{"set": "gsm8k", "prediction": text, "generated_tokens": tokens, "correct": correct} for text, tokens, correct in answers]
    lines.append({"set": "gsm8k", "index": 9, "cot_nll_sum": 1.0})  # a scored-only entry: no answer to diagnose
    (folder / "tiny-rku-uniform-20.predictions.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    (found,) = answers_module.answer_sets()
    assert (found.label, found.cap, found.correct, found.cut) == ("tiny-rku-uniform-20 (t8)", 8, [True, False, False], [False, False, True])
    assert (found.steps, found.steps_right) == ([1, 1, 2], [1, 0, 2])
    line = next(x for x in render.answers_section([found]) if x.startswith("| tiny-rku-uniform-20 (t8) |"))
    assert "| 1/3 [" in line and "| 1/2 [" in line and line.endswith("| 1.3 | — (4 steps) |"), line


def test_calibration_source_pairs_kl_on_number_tokens():
    """The KL split by token class gets its own paired cell (self − gold on the same questions)."""
    def row(source: str, kl: float, kl_numbers: float) -> dict:
        n = 4
        columns = {"index": list(range(n)), "kl_sum": [kl * 10] * n, "tokens": [10] * n,
                   "kl_sum_reasoning": [kl_numbers * 3 + 0.01 * i for i in range(n)], "tokens_reasoning": [3] * n}
        return {"row_id": "m-rku-uniform-40", "row": {"model": "m", "importance": "rku", "allocation": "uniform", "sparsity": 0.4},
                "settings": {"gsm8k_limit": n, "calib_samples": 16, "calib_source": source, "max_new_tokens": 256, "generate": False,
                             "calib_max_length": 256},
                "gsm8k": {"cot_nll": 1.0, "kl_to_dense": kl, "kl_to_dense_gold": kl, "kl_to_dense_reasoning": kl_numbers},
                "gsm8k_nll": {"cot_nll_sum": [10.0] * n, "cot_tokens": [10] * n},
                "gsm8k_kl": {"kl_to_dense": columns, "kl_to_dense_gold": columns}}

    lines = render.calibration_source_section([row("gold", 0.4, 0.2), row("self", 0.35, 0.5)])
    line = next(x for x in lines if x.startswith("| m | uniform | 40% | rku |"))
    assert line.endswith("| 0.200 | 0.500 (+0.300 [+0.300, +0.300]) |"), line


def test_calibration_source_accuracy_pairs_rows_on_the_questions_both_answered():
    """Self-calibrated answers are paired with gold-calibrated ones of the same row, on common questions only,
    and never with a gold row calibrated on another sample size."""
    def row(source: str, window: int, gsm8k: list[bool], svamp: list[bool], size: int = 16) -> dict:
        return {"row_id": "m-rku-uniform-20", "row": {"model": "m", "importance": "rku", "allocation": "uniform", "sparsity": 0.2},
                "settings": {"gsm8k_limit": len(gsm8k), "calib_samples": size, "calib_source": source, "max_new_tokens": 256,
                             "calib_max_length": window},
                "gsm8k_correct": gsm8k, "gsm8k_indices": list(range(len(gsm8k))),
                "svamp_correct": svamp, "svamp_indices": list(range(len(svamp)))}

    gold = row("gold", 256, [True, False, False, True, True, True], [False, False])  # 6 GSM8K questions, 4 shared
    other_size = row("gold", 256, [False] * 4, [False, False], size=128)
    own = row("self", 640, [True, True, True, False], [True, False])
    (line,) = [x for x in render.calibration_source_accuracy_section([gold, other_size, own]) if x.startswith("| m |")]
    assert "| self, 16 problems, 640-token window | gold, 16 problems, 256-token window |" in line
    # GSM8K: 3 vs 2 of the 4 shared questions; SVAMP 1 vs 0 of 2; both: 4 vs 2 of 6.
    assert "| 3 vs 2 of 4: +1 [" in line and "| 1 vs 0 of 2: +1 [" in line and "| 4 vs 2 of 6: +2 [" in line, line
    assert render.calibration_source_accuracy_section([other_size, own]) == []
    # Gold in the row's own window too: the source at a fixed window, and the window at a fixed source.
    gold_long = row("gold", 640, [True, True, False, False], [True, True])
    lines = [x for x in render.calibration_source_accuracy_section([gold, gold_long, own]) if x.startswith("| m |")]
    pairs = [tuple(cell.strip() for cell in x.split("|")[6:8]) for x in lines]
    assert pairs == [("gold, 16 problems, 640-token window", "gold, 16 problems, 256-token window"),
                     ("self, 16 problems, 640-token window", "gold, 16 problems, 256-token window"),
                     ("self, 16 problems, 640-token window", "gold, 16 problems, 640-token window")], pairs
    assert "| 3 vs 2 of 4: +1 [" in lines[2] and "| 1 vs 2 of 2: -1 [" in lines[2], lines[2]
    # A comparison made on two rows is also summed over them, question by question.
    flap_gold, flap_own = (dict(r, row_id="m-flap-uniform-20") for r in (gold, own))
    section = render.calibration_source_accuracy_section([gold, own, flap_gold, flap_own])
    (pooled,) = [x for x in section if "| flap 20%, rku 20% |" in x]
    assert pooled.startswith("| m | 256 | self, 16 problems, 640-token window | gold, 16 problems, 256-token window |")
    assert "| 6 | +4 [" in pooled, pooled  # 6 shared questions, +2 in each row
    # Another calibration seed is another measurement: it pairs only with gold on its own problems, says so.
    reseeded = [dict(r, settings={**r["settings"], "seed": 1}) for r in (gold, own)]
    lines = [x for x in render.calibration_source_accuracy_section([gold, *reseeded]) if x.startswith("| m |")]
    assert len(lines) == 1 and "| self, 16 problems, seed 1, 640-token window | gold, 16 problems, seed 1, 256-token" in lines[0]
    assert render.calibration_source_accuracy_section([gold, reseeded[1]]) == []
    # Both samples measured: the comparison is also summed over them (+2 on each sample's 6 shared questions).
    section = render.calibration_source_accuracy_section([gold, own, *reseeded])
    (over_seeds,) = [x for x in section if "all seeds" in x]
    assert "| self, 16 problems, 640-token window, all seeds | gold, 16 problems, 256-token window, all seeds |" in over_seeds
    assert "| seed 0 (rku 20%), seed 1 (rku 20%) | 6 | +4 [" in over_seeds, over_seeds
    assert not any("all seeds" in x for x in render.calibration_source_accuracy_section([gold, own, flap_gold, flap_own]))


def test_method_gaps_are_summed_over_calibration_seeds_and_only_paired_within_one():
    """RKU − FLAP on seed 0 and seed 1 (same questions) sums per question; a FLAP row with no RKU row on its own
    seed is not paired, and one seed alone makes no sum."""
    def row(method: str, seed: int, gsm8k: list[bool]) -> dict:
        return {"row_id": f"m-{method}-uniform-30", "row": {"model": "m", "importance": method, "allocation": "uniform", "sparsity": 0.3},
                "settings": {"gsm8k_limit": len(gsm8k), "calib_samples": 16, "calib_source": "self", "max_new_tokens": 256,
                             "calib_max_length": 640, "seed": seed},
                "gsm8k_correct": gsm8k, "gsm8k_indices": list(range(len(gsm8k))),
                "svamp_correct": [False], "svamp_indices": [0]}

    seed0 = [row("rku", 0, [True, True, False]), row("flap", 0, [False, True, False])]  # +1
    seed1 = [row("rku", 1, [True, False, True]), row("flap", 1, [False, False, False])]  # +2
    (line,) = [x for x in render.seed_pooled_section(seed0 + seed1) if x.startswith("| m |")]
    assert "| rku, uniform 30%, first 3 GSM8K, self, 16 problems, 640-token window | flap | seed 0, seed 1 | 4 | +3 [" in line, line
    assert render.seed_pooled_section(seed0 + seed1[1:]) == []
    assert render.seed_pooled_section(seed0) == []
