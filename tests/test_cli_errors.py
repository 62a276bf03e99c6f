"""Every output path and budget is checked before model work; errors are one line with exit 2 (usage) or 1."""

from __future__ import annotations

import json
import re
import time

import pytest
from conftest import tiny_model, tiny_tokenizer

from rku_lightning.cli import evaluate, prune
from rku_lightning.files import write_text_atomic


@pytest.fixture
def tiny_dir(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama", max_position_embeddings=1024).save_pretrained(folder)
    tiny_tokenizer(tmp_path).save_pretrained(folder)
    return folder


def one_error_line(stderr: str) -> str:
    """The error line (progress bars of model loading share stderr)."""
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


def _prepare(tmp_path) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    (tmp_path / "empty.jsonl").write_text("")


PRUNE = [
    (["--out", "{tmp}/a-file"], 2, "--out: out_dir .* is a file"),
    (["--out", "{tmp}/a-file/sub"], 2, "a-file is a file, so nothing can be created"),
    (["--out", "{tmp}/notes"], 2, "not empty; .*--overwrite"),
    (["--out", "{tmp}/notes", "--overwrite"], 2, "not an rku_lightning export"),
    (["--batch-size", "0"], 2, "--batch-size must be a positive integer, got 0"),
    (["--samples", "0"], 2, "--samples must be a positive integer"),
    (["--threads", "0"], 2, "--threads must be a positive integer"),
    (["--sparsity", "1.5"], 2, r"--sparsity must be a number in \[0, 1\)"),
    # unreachable: refused right after loading, before calibrating (no "calibrate" progress bar)
    (["--sparsity", "0.99"], 2, r"--sparsity=0.99 is unreachable: --min-mlp-keep=0.1 .* cap it at 0\.\d{4} \(uniform allocation\); lower --sparsity"),
    (["--model", "{tmp}/no/such/model"], 1, "FileNotFoundError: model: .* does not exist"),
    (["--model", "{tmp}/notes"], 1, "folder without config.json"),
    (["--calibration", "{tmp}/empty.jsonl"], 1, "empty.jsonl is empty"),
    (["--calibration", "{tmp}/empty.jsonl", "--model", "{tmp}/no-weights"], 1, "empty.jsonl is empty"),  # data before model
]


@pytest.mark.parametrize("extra, status, message", PRUNE, ids=[" ".join(e[0]) for e in PRUNE])
def test_prune_cli_errors(tmp_path, tiny_dir, capsys, extra, status, message):
    _prepare(tmp_path)
    argv = ["--model", str(tiny_dir), "--sparsity", "0.3", "--samples", "2", "--out", str(tmp_path / "new")]
    argv += [a.format(tmp=tmp_path) for a in extra]
    before = sorted(tmp_path.rglob("*"))
    started = time.perf_counter()
    assert prune.cli(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and one_error_line(err).startswith("python -m rku_lightning.cli.prune: error: "), err
    assert "calibrate (" not in err
    assert re.search(message, err), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing removed
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize(
    "command, argv, message",
    [
        (prune.cli, ["--model", "m", "--sparsity", "x", "--out", "o"], "argument --sparsity: invalid float value: 'x'"),
        (evaluate.cli, ["--model", "m", "--json", "r.json", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_bad_argument_is_one_line_with_status_2(command, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        command(argv)
    assert exit_.value.code == 2
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    argv = ["--model", str(tmp_path / "missing"), "--sparsity", "0.3", "--out", str(tmp_path / "o")]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("RKU_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prune.cli(argv)


def test_sparsity_zero_and_a_short_calibration_set_warn_and_are_recorded(tmp_path, tiny_dir, shared_data):
    data = tmp_path / "three.jsonl"
    data.write_text("".join(line + "\n" for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:3]))
    with pytest.warns(UserWarning) as caught:
        prune.main(["--model", str(tiny_dir), "--sparsity", "0", "--samples", "8", "--calibration", str(data),
                    "--batch-size", "2", "--max-length", "700", "--out", str(tmp_path / "out"), "--threads", "1"])
    messages = " | ".join(str(w.message) for w in caught)
    assert "--sparsity 0 removes nothing" in messages and "samples=8 but the calibration set has 3" in messages
    plan = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert plan["calibration"] == {"requested_samples": 8, "samples": 3}


EVALUATE = [
    (["--json", "{tmp}/notes"], 2, "--json: .*notes is a folder"),
    (["--json", "{tmp}/a-file/report.json"], 2, "a-file is a file"),
    (["--batch-size", "0"], 2, "--batch-size: must be a positive integer"),
    (["--data", "{tmp}/empty.jsonl"], 1, "empty.jsonl is empty"),
    (["--model", "{tmp}/no/such/model"], 1, "does not exist"),
]


@pytest.mark.parametrize("extra, status, message", EVALUATE, ids=[" ".join(e[0]) for e in EVALUATE])
def test_evaluate_cli_errors(tmp_path, tiny_dir, shared_data, capsys, extra, status, message):
    _prepare(tmp_path)
    argv = ["--model", str(tiny_dir), "--data", str(shared_data / "gsm8k" / "test.jsonl"), "--limit", "1",
            "--json", str(tmp_path / "r.json"), "--no-progress", "--max-new-tokens", "2"]
    argv += [a.format(tmp=tmp_path) for a in extra]
    before = sorted(tmp_path.rglob("*"))
    assert evaluate.cli(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and one_error_line(err), err
    assert re.search(message, err), err
    assert sorted(tmp_path.rglob("*")) == before


def test_a_failed_report_write_leaves_no_orphan_predictions(tmp_path, tiny_dir, shared_data, monkeypatch):
    def failing(path, text):
        if path.name == "r.json":
            raise OSError("disk full")
        write_text_atomic(path, text)

    monkeypatch.setattr(evaluate, "write_text_atomic", failing)
    argv = ["--model", str(tiny_dir), "--data", str(shared_data / "gsm8k" / "test.jsonl"), "--limit", "1",
            "--json", str(tmp_path / "out" / "r.json"), "--no-progress", "--max-new-tokens", "2"]
    assert evaluate.cli(argv) == 1
    assert list((tmp_path / "out").iterdir()) == []


def test_a_limit_beyond_the_data_warns_and_the_report_counts_what_ran(tmp_path, tiny_dir, shared_data):
    data = tmp_path / "two.jsonl"
    data.write_text("".join(line + "\n" for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:2]))
    with pytest.warns(UserWarning, match="limit=5 but .* has 2 usable records"):
        evaluate.main(["--model", str(tiny_dir), "--data", str(data), "--limit", "5", "--json", str(tmp_path / "r.json"),
                       "--no-progress", "--max-new-tokens", "2", "--no-nll"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["problems"] == 2 and report["settings"]["limit"] == 5
