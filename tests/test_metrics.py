"""Token classification, metric accumulation and DDP-style merging of metric states."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_tokenizer

from rku_lightning.evaluation.metrics import (
    ChainOfThoughtNLL,
    ReasoningAccuracy,
    TextPerplexity,
    classify_tokens,
    reasoning_char_mask,
    reasoning_token_mask,
    sequence_nll,
    summarise_nll,
)


def _marked(text: str) -> str:
    return "".join(ch if keep else "_" for ch, keep in zip(text, reasoning_char_mask(text)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16 - 3 = 13", "16_-_3_=_13"),
        ("a well-known fact", "_________________"),
        ("<<9*2=18>>18 eggs", "<<9*2=18>>18_____"),
        ("$<<a b>>x", "_<<a b>>_"),
        ("It costs 2.50. Then", "_________2.50______"),
        ("1,000 people, sadly", "1,000______________"),
        ("-5 and (3+4)", "-5______3+4_"),
        ("half/whole", "__________"),
        ("#### 18", "_____18"),
    ],
)
def test_reasoning_characters(text: str, expected: str) -> None:
    assert _marked(text) == expected


def test_token_is_reasoning_when_any_character_is() -> None:
    text = "She makes 9 * 2 = <<9*2=18>>18 dollars."
    offsets = [(0, 3), (3, 9), (9, 11), (11, 13), (13, 15), (15, 17), (17, 19), (19, 28), (28, 30), (30, 38), (38, 39)]
    # "She", " makes", " 9", " *", " 2", " =", " <", "<9*2=18>", ">18", " dollars", "."
    assert classify_tokens(text, offsets) == [False, False, True, True, True, True, True, True, True, False, False]


def test_offset_mapping_and_decoding_agree(tmp_path) -> None:
    tokenizer = tiny_tokenizer(tmp_path)
    text = "He pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 12"
    ids_a, mask_a = reasoning_token_mask(tokenizer, text)
    ids_b, mask_b = reasoning_token_mask(tokenizer, text, use_offset_mapping=False)
    assert ids_a == ids_b and mask_a == mask_b
    assert mask_a == reasoning_char_mask(text)  # one character per token


class _NoOffsets:
    """A tokenizer stand-in that, like slow tokenizers, cannot return offsets."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError("return_offsets_mapping is not available when using Python tokenizers")
        return self.inner(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=False):
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_falls_back_to_decoding_without_offsets(tmp_path) -> None:
    tokenizer = tiny_tokenizer(tmp_path)
    text = "Total = 5 + 6 = 11 apples"
    assert reasoning_token_mask(_NoOffsets(tokenizer), text) == reasoning_token_mask(tokenizer, text)


def test_accuracy_accumulates_over_updates() -> None:
    metric = ReasoningAccuracy()
    metric.update(["#### 18", "The answer is 4."], [18, "3"], num_tokens=[5, 7])
    metric.update(["no idea", "\\boxed{1,000}"], [2.0, "1,000"], num_tokens=[3, 9])
    result = metric.compute()
    assert result["accuracy"].item() == pytest.approx(0.5)
    assert result["accuracy"].dtype.is_floating_point
    assert result["total"] == 4 and result["correct"] == 2 and result["no_answer"] == 1
    assert result["no_answer_rate"].item() == pytest.approx(0.25)
    assert result["mean_tokens"].item() == pytest.approx(6.0)
    assert result["mean_chars"].item() == pytest.approx(sum(map(len, ["#### 18", "The answer is 4.", "no idea", "\\boxed{1,000}"])) / 4)


def test_accuracy_without_token_counts_reports_nan_length() -> None:
    metric = ReasoningAccuracy()
    metric.update(["#### 1"], [1])
    assert math.isnan(metric.compute()["mean_tokens"].item())
    assert math.isnan(metric.compute()["truncated_rate"].item())


def test_accuracy_counts_answers_cut_at_the_cap() -> None:
    metric = ReasoningAccuracy(max_new_tokens=8)
    metric.update(["#### 18", "First, 3 + 4 = 7 and then"], [18, 9], num_tokens=[5, 8])
    metric.update(["#### 2"], [2], num_tokens=[9])  # over the cap (a stop string ended it late): cut too
    result = metric.compute()
    assert result["truncated"] == 2 and result["truncated_rate"].item() == pytest.approx(2 / 3)
    assert result["steps"] == 1 and result["steps_right_rate"].item() == pytest.approx(1.0)  # 3 + 4 = 7
    metric.update(["So 2 * 6 = 13, and 13 - 1 = 12 #### 12"], [12], num_tokens=[7])
    assert metric.compute()["steps"] == 3 and metric.compute()["steps_right_rate"].item() == pytest.approx(2 / 3)
    assert math.isnan(ReasoningAccuracy().compute()["truncated_rate"].item())  # no cap: not counted


def test_accuracy_rejects_bad_input() -> None:
    metric = ReasoningAccuracy()
    with pytest.raises(ValueError, match="answers"):
        metric.update(["#### 1", "#### 2"], [1])
    with pytest.raises(ValueError, match="answers"):
        metric.update(["#### 1"], ["one"])
    with pytest.raises(ValueError, match="num_tokens"):
        metric.update(["#### 1"], [1], num_tokens=[1, 2])


def test_accuracy_states_merge_like_ddp_ranks() -> None:
    generations = ["#### 1", "#### 2", "the answer is 3", "4", "nothing", "#### 6"]
    answers = [1, 2, 5, 4, 5, 6]
    whole = ReasoningAccuracy()
    whole.update(generations, answers, [1, 2, 3, 4, 5, 6])
    rank0, rank1 = ReasoningAccuracy(), ReasoningAccuracy()
    rank0.update(generations[::2], answers[::2], [1, 3, 5])
    rank1.update(generations[1::2], answers[1::2], [2, 4, 6])
    rank0.merge_state(rank1)
    for key, value in whole.compute().items():
        torch.testing.assert_close(rank0.compute()[key], value, equal_nan=True)
    assert all(reduction == "sum" or callable(reduction) for reduction in rank0._reductions.values())


def _random_batch(seed: int = 0, batch: int = 3, length: int = 10):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, VOCAB, generator=gen)
    labels = torch.randint(0, VOCAB, (batch, length), generator=gen)
    labels[:, :4] = -100  # prompt
    labels[0, :6] = -100  # longer prompt / left padding
    reasoning = torch.rand(batch, length, generator=gen) > 0.5
    return logits, labels, reasoning


def test_cot_nll_matches_cross_entropy_split_by_class() -> None:
    logits, labels, reasoning = _random_batch()
    metric = ChainOfThoughtNLL()
    metric.update(logits, labels, reasoning)
    result = metric.compute()
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
    valid = labels[:, 1:] != -100
    is_reasoning = reasoning[:, 1:] & valid
    assert result["nll"].item() == pytest.approx(per_token[valid].mean().item(), rel=1e-5)
    assert result["nll_reasoning"].item() == pytest.approx(per_token[is_reasoning].mean().item(), rel=1e-5)
    assert result["nll_other"].item() == pytest.approx(per_token[valid & ~is_reasoning].mean().item(), rel=1e-5)
    assert result["tokens"] == valid.sum() == result["tokens_reasoning"] + result["tokens_other"]
    assert result["ppl"].item() == pytest.approx(math.exp(result["nll"].item()), rel=1e-5)


def test_sequence_nll_rows_are_per_sequence_sums_that_pool_to_the_metric() -> None:
    logits, labels, reasoning = _random_batch()
    rows = sequence_nll(logits, labels, reasoning)
    assert rows.shape == (labels.shape[0], 4) and rows.dtype == torch.float64
    for b in range(labels.shape[0]):
        valid = labels[b, 1:] != -100
        per_token = F.cross_entropy(logits[b, :-1], labels[b, 1:], reduction="none", ignore_index=-100)
        assert rows[b, 1] == valid.sum() and rows[b, 3] == (reasoning[b, 1:] & valid).sum()
        assert rows[b, 0].item() == pytest.approx(per_token[valid].sum().item(), rel=1e-5)
    metric = ChainOfThoughtNLL()
    metric.update(logits, labels, reasoning)
    for key, value in summarise_nll(rows.sum(0)).items():
        torch.testing.assert_close(value, metric.compute()[key])


def test_cot_nll_merge_equals_single_pass() -> None:
    batches = [_random_batch(seed) for seed in range(4)]
    whole, rank0, rank1 = ChainOfThoughtNLL(), ChainOfThoughtNLL(), ChainOfThoughtNLL()
    for i, batch in enumerate(batches):
        whole.update(*batch)
        (rank0 if i % 2 == 0 else rank1).update(*batch)
    rank0.merge_state(rank1)
    for key, value in whole.compute().items():
        torch.testing.assert_close(rank0.compute()[key], value)


def test_cot_nll_empty_is_nan_and_bad_mask_raises() -> None:
    metric = ChainOfThoughtNLL()
    assert math.isnan(metric.compute()["nll"].item())
    logits, labels, reasoning = _random_batch()
    with pytest.raises(ValueError, match="reasoning_mask"):
        metric.update(logits, labels, reasoning[:, 1:])


def test_text_perplexity_is_exp_mean_nll() -> None:
    logits, labels, reasoning = _random_batch()
    ppl = TextPerplexity()
    ppl.update(logits, labels)
    nll = ChainOfThoughtNLL()
    nll.update(logits, labels, reasoning)
    assert ppl.compute().item() == pytest.approx(nll.compute()["ppl"].item(), rel=1e-4)
