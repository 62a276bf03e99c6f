"""Self-generated traces: generation, the on-disk cache (hit, miss, invalidation), filtering."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from rku_lightning.evaluation.data import Problem
from rku_lightning.evaluation.prompts import encode_solution
from rku_lightning.evaluation.traces import Trace, as_problems, cached_traces, model_digest, trace_counts

PROBLEMS = [Problem(question=f"What is {a} + {a}?", solution=f"#### {2 * a}", answer=float(2 * a), index=i) for i, a in enumerate(range(1, 6))]


@pytest.fixture
def lm(tmp_path):
    return tiny_model("llama"), tiny_tokenizer(tmp_path)


def _run(lm, tmp_path, problems=PROBLEMS, **kwargs):
    model, tokenizer = lm
    return cached_traces(model, tokenizer, problems, max_new_tokens=kwargs.pop("max_new_tokens", 6), batch_size=2,
                         folder=tmp_path / "traces", progress=False, **kwargs)


def test_miss_generates_and_writes_then_hit_reads_the_same(lm, tmp_path) -> None:
    traces, record = _run(lm, tmp_path)
    assert not record["hit"] and len(traces) == len(PROBLEMS)
    assert [t.index for t in traces] == [p.index for p in PROBLEMS]
    assert all(0 < t.tokens <= 6 for t in traces)
    stored = json.loads((tmp_path / "traces").glob("*.json").__next__().read_text())
    assert stored["key"]["max_new_tokens"] == 6 and len(stored["traces"]) == len(PROBLEMS)
    again, record2 = _run(lm, tmp_path)
    assert record2["hit"] and again == traces


@pytest.mark.parametrize("change", ["weights", "questions", "max_new_tokens"])
def test_a_changed_key_regenerates(lm, tmp_path, change) -> None:
    _run(lm, tmp_path)
    model, tokenizer = lm
    kwargs: dict = {}
    problems = PROBLEMS
    if change == "weights":
        with torch.no_grad():
            model.lm_head.weight[0, 0] += 1.0
    elif change == "questions":
        problems = PROBLEMS[:-1]
    else:
        kwargs["max_new_tokens"] = 5
    _, record = _run((model, tokenizer), tmp_path, problems, **kwargs)
    assert not record["hit"]
    assert len(list((tmp_path / "traces").glob("*.json"))) == 2


def test_sharded_generation_gathers_the_same_traces(lm, tmp_path) -> None:
    """Two ranks each generate half; gathered and ordered, they equal the single-rank traces."""
    model, tokenizer = lm
    whole, _ = _run(lm, tmp_path / "one")
    shards = [cached_traces(model, tokenizer, PROBLEMS, 6, 2, tmp_path / f"r{r}", False, r, 1)[0] for r in (0,)]
    assert shards[0] == whole
    halves = [whole[0::2], whole[1::2]]
    gathered, _ = cached_traces(model, tokenizer, PROBLEMS, 6, 2, tmp_path / "two", False, 0, 2, gather=lambda mine: halves)
    assert gathered == whole
    with pytest.raises(ValueError, match="gather"):
        cached_traces(model, tokenizer, PROBLEMS, 6, 2, tmp_path / "x", False, 0, 2)


def test_digest_ignores_lora_but_not_weights() -> None:
    from rku_lightning.training.lora import inject_lora

    model = tiny_model("qwen2")
    before = model_digest(model)
    inject_lora(model, {"r": 2, "alpha": 4, "dropout": 0.0})
    assert model_digest(model) == before
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_" not in n).add_(1e-3)
    assert model_digest(model) != before


def test_as_problems_filters_and_trace_becomes_the_solution(tmp_path) -> None:
    traces = [
        Trace(0, "q0", 4.0, "2+2=4\n#### 4", 4.0, True, 7),
        Trace(1, "q1", 5.0, "#### 6", 6.0, False, 3),
        Trace(2, "q2", 1.0, "   ", None, False, 1),
    ]
    assert [p.index for p in as_problems(traces, "all")] == [0, 1, 2]
    kept = as_problems(traces, "correct")
    assert [(p.index, p.solution, p.answer) for p in kept] == [(0, "2+2=4\n#### 4", 4.0)]
    with pytest.raises(ValueError, match="keep='correct' left none of the 1 traces.*trace_keep='all'"):
        as_problems(traces[1:2], "correct")
    with pytest.raises(ValueError, match="keep must be one of"):
        as_problems(traces, "best")


def test_trace_counts_say_how_many_are_right_and_how_many_the_budget_stopped() -> None:
    traces = [
        Trace(0, "q0", 4.0, "2+2=4\n#### 4", 4.0, True, 7),
        Trace(1, "q1", 5.0, "#### 6", 6.0, False, 3),
        Trace(2, "q2", 1.0, "1 + 1 = 2, and then", None, False, 8),
    ]
    assert trace_counts(traces, max_new_tokens=8) == {"traces": 3, "correct": 1, "stopped": 1}
    assert trace_counts(traces, max_new_tokens=7) == {"traces": 3, "correct": 1, "stopped": 2}


def test_trace_problems_mask_the_prompt_and_label_the_trace(tmp_path) -> None:
    """Calibrating on `self` traces takes gradients from the generated tokens only: labels are -100 on the prompt."""
    tokenizer = tiny_tokenizer(tmp_path)
    problem = as_problems([Trace(0, "What is 2 + 2?", 4.0, "2+2=4 #### 4", 4.0, True, 12)])[0]
    encoded = encode_solution(tokenizer, problem, max_length=200)
    labelled = encoded["labels"] != -100
    text = tokenizer.decode(encoded["input_ids"][labelled])
    assert text.strip().startswith("2+2=4 #### 4")
    prompt = tokenizer.decode(encoded["input_ids"][~labelled])
    assert "What is 2 + 2?" in prompt and "####" not in prompt.split("What is 2 + 2?")[-1]


def test_current_calibration_source_regenerates_with_the_pruned_model(tmp_path):
    """`calibration_source='current'`: every call writes the traces anew with the model as it is now (RESP)."""
    import lightning as L
    from test_train_cli import write_config

    from rku_lightning import StructuredPruner
    from rku_lightning.training.datamodule import ReasoningDataModule
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    write_config(tmp_path)
    data = tmp_path / "data"
    module = CausalLMPruningModule(pretrained=str(tmp_path / "tiny"), kl_to_dense=False)
    datamodule = ReasoningDataModule(train_data=str(data / "gsm8k"), val_data=str(data / "gsm8k"), ood_task=None,
                                     val_limit=2, max_length=320, batch_size=2, calibration_samples=4,
                                     calibration_source="current", trace_max_new_tokens=8, reference_traces=False)
    datamodule.trainer = L.Trainer(accelerator="cpu", logger=False)
    datamodule.trainer.strategy.connect(module)
    datamodule.setup("fit")
    assert datamodule.calibration_info == {"source": "current"}  # nothing generated yet
    before = datamodule.calibration_dataloader()
    first = datamodule.calibration_info
    assert first["source"] == "current" and first["keep"] == "all" and first["traces"] == 4 and first["seconds"] > 0
    assert 0 <= first["correct"] <= 4 and 0 <= first["stopped"] <= 4
    again = datamodule.calibration_dataloader()
    assert datamodule.calibration_info is not first  # each call describes its own traces
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(before, again))  # same model, same traces
    StructuredPruner(module.model, importance="magnitude", allocation="uniform", progress=False).prune(0.6)
    after = datamodule.calibration_dataloader()
    assert len(after) == len(before) == 2
    changed = [not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(before, after)]
    assert any(changed)
    # The prompt part is the same question; only the generated answer differs.
    labelled = [(b["labels"] != -100).sum().item() for b in before]
    assert all(n > 0 for n in labelled)


def test_mixed_calibration_keeps_every_second_gold_solution_and_traces_the_others() -> None:
    from rku_lightning.evaluation.calibration import mixed_calibration_problems

    traces = [Trace(1, PROBLEMS[1].question, 4.0, "2+2=4\n#### 4", 4.0, True, 7),
              Trace(3, PROBLEMS[3].question, 8.0, "#### 6", 6.0, False, 3)]
    mixed = mixed_calibration_problems(PROBLEMS, traces)
    assert [p.index for p in mixed] == [0, 1, 2, 3, 4]
    assert [p.solution for p in mixed] == ["#### 2", "2+2=4\n#### 4", "#### 6", "#### 6", "#### 10"]
    assert [p.index for p in mixed_calibration_problems(PROBLEMS, traces, "correct")] == [0, 1, 2, 4]  # gold half stays
    with pytest.raises(ValueError, match=r"one trace for each of problems\[1::2\]"):
        mixed_calibration_problems(PROBLEMS, traces[::-1])


def test_mixed_calibration_source_is_the_self_sample_half_gold(tmp_path):
    """`calibration_source='mixed'`: the questions `self` would calibrate on, every second with its gold solution."""
    import lightning as L
    from test_train_cli import write_config

    from rku_lightning.training.datamodule import ReasoningDataModule
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    write_config(tmp_path)
    data = tmp_path / "data"
    module = CausalLMPruningModule(pretrained=str(tmp_path / "tiny"), kl_to_dense=False)
    modules = {}
    for source in ("gold", "self", "mixed"):
        datamodule = ReasoningDataModule(train_data=str(data / "gsm8k"), val_data=str(data / "gsm8k"), ood_task=None,
                                         val_limit=2, max_length=320, batch_size=2, calibration_samples=4,
                                         calibration_source=source, trace_max_new_tokens=8, reference_traces=False,
                                         trace_cache=str(tmp_path / "traces"))
        datamodule.trainer = L.Trainer(accelerator="cpu", logger=False)
        datamodule.trainer.strategy.connect(module)
        datamodule.setup("fit")
        modules[source] = datamodule
    mixed, own = modules["mixed"].calibration_problems, modules["self"].calibration_problems
    gold = {p.index: p.solution for p in modules["gold"].calibration_problems}
    assert [p.index for p in mixed] == [p.index for p in own] and len(mixed) == 4
    assert [p.solution == gold[p.index] for p in mixed] == [True, False, True, False]
    assert modules["mixed"].calibration_info["source"] == "mixed" and modules["mixed"].calibration_info["traces"] == 2
    assert len(modules["mixed"].calibration_dataloader()) == 2


def test_learning_from_cut_text_warns_naming_the_option_to_raise(tmp_path):
    """Traces stopped at trace_max_new_tokens have no final answer, and max_length can cut the end off solutions:
    the data module says so (recovery on such text learns the opening prose, not the arithmetic and answer)."""
    import lightning as L
    from test_train_cli import write_config

    from rku_lightning.evaluation.prompts import solution_lengths
    from rku_lightning.training.datamodule import ReasoningDataModule
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    write_config(tmp_path)
    data = tmp_path / "data"
    long = tmp_path / "long"
    long.mkdir()
    steps = "".join(f"{a} + 1 = {a + 1}\n" for a in range(24))
    (long / "train.jsonl").write_text("\n".join(json.dumps({"question": f"Count to {12 + a}.", "answer": steps + f"#### {12 + a}"})
                                                for a in range(4)) + "\n")
    module = CausalLMPruningModule(pretrained=str(tmp_path / "tiny"), kl_to_dense=False)

    def setup(train, **kwargs):
        datamodule = ReasoningDataModule(train_data=str(train), val_data=str(data / "gsm8k"), ood_task=None, val_limit=2,
                                         batch_size=2, reference_traces=False, trace_cache=str(tmp_path / "traces"), **kwargs)
        datamodule.trainer = L.Trainer(accelerator="cpu", logger=False)
        datamodule.trainer.strategy.connect(module)
        datamodule.setup("fit")
        return datamodule

    with pytest.warns(UserWarning, match=r"train_source: 4 of 4 dense traces stopped at trace_max_new_tokens=1"):
        setup(data / "gsm8k", train_source="self", trace_samples=4, trace_max_new_tokens=1, max_length=320)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keeping only right traces drops the stopped ones: no advice to do so
        with pytest.raises(ValueError, match="trace_keep"):  # and none of a random model's 1-token traces is right
            setup(data / "gsm8k", train_source="self", trace_samples=4, trace_max_new_tokens=1, max_length=320,
                  trace_keep="correct")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # long enough: no warning
        whole = setup(long, max_length=400)
    longest = max(p + s for p, s in solution_lengths(whole.tokenizer, whole.train_problems))
    prompt = max(p for p, _ in solution_lengths(whole.tokenizer, whole.train_problems))
    assert longest - prompt > 100
    with pytest.warns(UserWarning, match=rf"train_source='gold': max_length={longest - 40} cuts the end off 4 of 4 solutions "
                                         rf"\(\d+% of their tokens, final answers included\); max_length={longest} keeps them whole") as caught:
        setup(long, max_length=longest - 40)
    assert any(str(w.message).startswith("calibration_source='gold': max_length=") for w in caught)  # it calibrates on them too
