"""`benchmarks.recover_kl` on a tiny model: a recover row's KL to dense, split by token class, reproduces its log."""

from __future__ import annotations

import json

import pytest

import benchmarks.common as common
import benchmarks.recover as recover
import benchmarks.recover_kl as recover_kl
import benchmarks.render as render


def test_the_split_kl_reproduces_the_logged_kl_and_renders_paired(bench_env, monkeypatch):
    from test_train_cli import write_config

    monkeypatch.setattr(recover, "CONFIG", str(write_config(bench_env)))
    monkeypatch.setattr(recover, "WORK", bench_env / "work")
    monkeypatch.setitem(recover.PRESETS, "tiny", ["--pruning.rounds=1", "--data.val_limit=3"])
    rid = recover.row_id("magnitude", "tiny")
    with pytest.raises(SystemExit):  # no recover row yet
        recover_kl.main(["--method", "magnitude", "--preset", "tiny", "--threads", "1"])
    common.write_row("recover", rid, recover.run_row("magnitude", "tiny", threads=1))
    record = recover_kl.kl_row("magnitude", "tiny", threads=1)
    assert record["reproduces"] and record["traces_cached"]  # the data module's own traces, found again
    for text in ("dense", "gold"):
        part, columns = record[text], record[text]["per_question"]
        assert len(columns["index"]) == 3 and part["kl"] > 0
        assert part["kl"] == pytest.approx(part["logged"], rel=recover_kl.TOLERANCE)  # the gold text's too
        assert [r + o for r, o in zip(columns["tokens_reasoning"], columns["tokens_other"])] == columns["tokens"]
        # The overall mean is the token-weighted mix of the two classes'.
        share = part["reasoning_token_share"]
        assert part["kl"] == pytest.approx(share * part["kl_reasoning"] + (1 - share) * part["kl_other"], rel=1e-9)
    # A logged value the export does not give: the row says so.
    path = common.row_path("recover", rid)
    row = json.loads(path.read_text())
    row["report"]["rounds"][-1]["metrics"]["val/kl_to_dense"] *= 1.01
    path.write_text(json.dumps(row))
    assert not recover_kl.kl_row("magnitude", "tiny", threads=1)["reproduces"]
    common.write_row(recover_kl.STAGE, rid, record)
    # FLAP's run of the same preset, as if it drifted twice as much everywhere: each "all" gap is minus the first row's KL.
    doubled = {text: {**record[text], "per_question": {**record[text]["per_question"], **{
        key: [2 * v for v in record[text]["per_question"][key]] for key in ("kl_sum", "kl_sum_reasoning", "kl_sum_other")}}}
        for text in ("dense", "gold")}
    common.write_row(recover_kl.STAGE, recover.row_id("flap", "tiny"), {**record, **doubled, "method": "flap"})
    section = render.render().read_text().split("## Where recovered models drift", 1)[1].split("\n## ", 1)[0]
    assert f"| {rid} |" in section and "not reproduced" not in section
    pair = next(line for line in section.splitlines() if line.startswith("| magnitude − flap (`tiny`) |"))
    cells = [c.strip() for c in pair.strip("|").split("|")]
    assert cells[1].startswith(f"{-record['dense']['kl']:+.3f} [") and cells[4].startswith(f"{-record['gold']['kl']:+.3f} [")
