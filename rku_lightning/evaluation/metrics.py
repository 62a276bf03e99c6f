"""Reasoning metrics: final-answer accuracy, chain-of-thought NLL split by token class, perplexity, KL to a reference.

All metric states are sums (``dist_reduce_fx="sum"``), so torchmetrics syncs them across DDP ranks and
two metric objects can be merged with ``merge_state``. The rules are documented in docs/evaluation.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.text import Perplexity
from transformers import PreTrainedTokenizerBase

from .arithmetic import written_steps

IGNORE_INDEX = -100

# A number as models and people write it: optional sign and currency, thousands separators, decimals,
# and an optional fraction `a/b`. The look-behind stops `3-4` from reading as `-4` and `x2` as `2`; a
# minus sign counts only when it touches the number, so `16 - 3` is not `-3`.
_NUMBER = (
    r"(?<![\w.])(?P<sign>-(?=\$?\.?\d))?\$?\s?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<frac>\.\d+)?"
    r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?)(?![\d/]))?"
)
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*(.+)")
_BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|=|:)\s*:?\s*(?:\*\*)?\s*(.{0,40})", re.IGNORECASE
)
_LATEX_NOISE_RE = re.compile(r"\\text\{[^{}]*\}|\\[,;!: ]|\\%|\\\$|\\left|\\right|\\mathrm|\\\(|\\\)")


def _numbers(text: str) -> list[float]:
    """Every number in `text`, in order, with separators, currency, signs and fractions resolved."""
    values = []
    for match in _NUMBER_RE.finditer(text.replace("\u2212", "-")):
        whole, frac, den = match.group("int"), match.group("frac"), match.group("den")
        if whole is None and frac is None:
            continue
        value = float((whole or "0").replace(",", "") + (frac or ""))
        if den is not None:
            denominator = float(den)
            if denominator == 0:
                continue
            value /= denominator
        values.append(-value if match.group("sign") else value)
    return values


def parse_number(text: str | float | int) -> float | None:
    """The first number in `text` (or the number itself): how gold answers such as ``"1,450,000"`` are read."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    found = _numbers(str(text))
    return found[0] if found else None


def _boxed_value(content: str) -> float | None:
    content = _FRAC_RE.sub(r"\1/\2", content)
    return parse_number(_LATEX_NOISE_RE.sub(" ", content))


def extract_answer(text: str) -> float | None:
    """The final numeric answer of a generation, or None when it states none.

    Rules, first that yields a number wins (the last occurrence of each): ``#### N``, ``\\boxed{N}``,
    "the answer is N", then the last number anywhere in the text.
    """
    if not isinstance(text, str):
        raise ValueError(f"text: expected a string, got {type(text).__name__}")
    for match in reversed(_HASHES_RE.findall(text)):
        if (value := parse_number(match)) is not None:
            return value
    for match in reversed(_BOXED_RE.findall(text)):
        if (value := _boxed_value(match)) is not None:
            return value
    for match in reversed(_ANSWER_IS_RE.findall(text)):
        if (value := parse_number(_LATEX_NOISE_RE.sub(" ", _FRAC_RE.sub(r"\1/\2", match)))) is not None:
            return value
    found = _numbers(_LATEX_NOISE_RE.sub(" ", _FRAC_RE.sub(r"\1/\2", text)))
    return found[-1] if found else None


def answers_match(predicted: float | None, gold: float) -> bool:
    """Exact numeric match, tolerant only to float round-off (``0.1 + 0.2`` equals ``0.3``)."""
    return predicted is not None and math.isclose(predicted, gold, rel_tol=1e-6, abs_tol=1e-6)


def score_answer(generation: str, answer: float | str) -> tuple[float | None, bool]:
    """The final answer extracted from one generation, and whether it equals the gold number."""
    gold = parse_number(answer)
    if gold is None:
        raise ValueError(f"answers: {answer!r} is not a number")
    predicted = extract_answer(generation)
    return predicted, answers_match(predicted, gold)


class ReasoningAccuracy(Metric):
    """Share of generations whose extracted final answer equals the gold number.

    Also counts generations with no extractable answer (format compliance) and their mean length, in
    characters always and in tokens when the caller passes token counts. With `max_new_tokens` and token
    counts it counts the generations cut at that cap: a truncated answer is scored wrong whatever its
    reasoning, so a high `truncated_rate` says the budget, not the model, decided those questions.
    `steps_right_rate` is the share of the binary steps the generations write out (``a op b = c``) that
    are computed right (`arithmetic.written_steps`): wrong answers with right steps lost the plan,
    wrong steps lost the arithmetic.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, max_new_tokens: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_new_tokens = max_new_tokens
        for name in ("correct", "total", "no_answer", "chars", "tokens", "counted_tokens", "truncated", "steps", "steps_right"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        generations: Sequence[str],
        answers: Sequence[float | str],
        num_tokens: Sequence[int] | None = None,
    ) -> None:
        if len(generations) != len(answers):
            raise ValueError(f"answers: expected {len(generations)} answers (one per generation), got {len(answers)}")
        if num_tokens is not None and len(num_tokens) != len(generations):
            raise ValueError(f"num_tokens: expected {len(generations)} counts, got {len(num_tokens)}")
        for text, answer in zip(generations, answers):
            predicted, correct = score_answer(text, answer)
            self.correct += int(correct)
            self.no_answer += int(predicted is None)
            self.chars += len(text)
            steps = written_steps(text)
            self.steps += len(steps)
            self.steps_right += sum(step.correct for step in steps)
        self.total += len(generations)
        if num_tokens is not None:
            self.tokens += int(sum(num_tokens))
            self.counted_tokens += len(num_tokens)
            if self.max_new_tokens is not None:
                self.truncated += sum(int(n) >= self.max_new_tokens for n in num_tokens)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp(min=1).float()
        counted = self.counted_tokens.float()
        nan = torch.tensor(float("nan"))
        return {
            "accuracy": self.correct.float() / total,
            "correct": self.correct.clone(),
            "total": self.total.clone(),
            "no_answer": self.no_answer.clone(),
            "no_answer_rate": self.no_answer.float() / total,
            "mean_chars": self.chars.float() / total,
            "mean_tokens": self.tokens.float() / counted if self.counted_tokens > 0 else nan,
            "truncated": self.truncated.clone(),
            "truncated_rate": self.truncated.float() / counted if self.counted_tokens > 0 and self.max_new_tokens else nan,
            "steps": self.steps.clone(),
            "steps_right_rate": self.steps_right.float() / self.steps.float() if self.steps > 0 else nan,
        }


# ---- token classification for the CoT NLL split -------------------------------------------------

_CALC_SPAN_RE = re.compile(r"<<[^<>]*>>")
_OPERATORS = set("+-*/×÷^%−")
_OPERAND_NEIGHBOURS = set("0123456789()$")


def _neighbour(text: str, start: int, step: int) -> str:
    index = start
    while 0 <= index < len(text) and text[index] in " \t":
        index += step
    return text[index] if 0 <= index < len(text) else ""


def reasoning_char_mask(text: str) -> list[bool]:
    """Per character: does it carry arithmetic? See docs/evaluation.md for the rules.

    Inside a GSM8K ``<<...>>`` calculator span (brackets included): yes. Elsewhere: digits, ``=``, an
    operator next to an operand (so the hyphen of "well-known" is not one), and ``.`` or ``,`` between
    two digits (decimal point, thousands separator).
    """
    mask = [False] * len(text)
    for span in _CALC_SPAN_RE.finditer(text):
        mask[span.start() : span.end()] = [True] * (span.end() - span.start())
    for i, ch in enumerate(text):
        if mask[i]:
            continue
        if ch.isdigit() or ch == "=":
            mask[i] = True
        elif ch in _OPERATORS:
            mask[i] = _neighbour(text, i - 1, -1) in _OPERAND_NEIGHBOURS - {""} or _neighbour(
                text, i + 1, 1
            ) in _OPERAND_NEIGHBOURS - {""}
        elif ch in ".,":
            mask[i] = 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
    return mask


def classify_tokens(text: str, offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """A token is a reasoning token when any character it covers is a reasoning character."""
    chars = reasoning_char_mask(text)
    return [any(chars[max(0, start) : min(end, len(chars))]) for start, end in offsets]


def _offsets_by_decoding(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Character spans recovered by decoding growing prefixes, for tokenizers without offset mapping."""
    offsets, previous = [], 0
    for i in range(len(ids)):
        end = min(len(tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False)), len(text))
        end = max(end, previous)
        offsets.append((previous, end))
        previous = end
    return offsets


def token_offsets(
    tokenizer: PreTrainedTokenizerBase, text: str, use_offset_mapping: bool = True
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens) and the character span of each token."""
    if use_offset_mapping:
        try:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]
        except (NotImplementedError, ValueError, TypeError, KeyError):
            pass  # slow tokenizers have no offset mapping: fall back to decoding
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids, _offsets_by_decoding(tokenizer, ids, text)


def reasoning_token_mask(
    tokenizer: PreTrainedTokenizerBase, text: str, use_offset_mapping: bool = True
) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it is a reasoning token."""
    ids, offsets = token_offsets(tokenizer, text, use_offset_mapping)
    return ids, classify_tokens(text, offsets)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of `labels` (HF convention: aligned with the inputs, -100 ignored) and its mask.

    Both outputs have the shape of ``labels[:, 1:]``: position t scores the token at t + 1.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits/labels: expected (B, T, V) and (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target.masked_fill(~valid, 0), reduction="none"
    )
    return nll * valid, valid


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor, reasoning_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums ``[nll, tokens, nll_reasoning, tokens_reasoning]`` (float64, shape (B, 4)).

    Sums rather than means, so that sequences can be pooled (token-weighted) or resampled per question
    for bootstrap intervals; `summarise_nll` turns pooled sums into the reported means.
    """
    if reasoning_mask.shape != labels.shape:
        raise ValueError(
            f"reasoning_mask: expected shape {tuple(labels.shape)} like labels, got {tuple(reasoning_mask.shape)}"
        )
    nll, valid = token_nll(logits, labels)
    reasoning = (reasoning_mask[:, 1:].bool() & valid).to(nll.dtype)
    columns = (nll.sum(1), valid.sum(1), (nll * reasoning).sum(1), reasoning.sum(1))
    return torch.stack([c.double() for c in columns], dim=1)


def summarise_nll(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token-weighted means of pooled `sequence_nll` sums, overall and per token class (NaN when empty)."""
    nll, tokens, nll_reasoning, tokens_reasoning = sums.double().unbind()
    nll_other, tokens_other = nll - nll_reasoning, tokens - tokens_reasoning

    def mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return (total / count).float() if count > 0 else torch.tensor(float("nan"))

    overall = mean(nll, tokens)
    return {
        "nll": overall,
        "nll_reasoning": mean(nll_reasoning, tokens_reasoning),
        "nll_other": mean(nll_other, tokens_other),
        "ppl": torch.exp(overall),
        "tokens": tokens.round().long(),
        "tokens_reasoning": tokens_reasoning.round().long(),
        "tokens_other": tokens_other.round().long(),
    }


class ChainOfThoughtNLL(Metric):
    """Teacher-forced NLL of gold solutions given the question, overall and per token class.

    Reasoning tokens (arithmetic) versus other tokens (syntax, words): pruning that keeps fluent text but
    loses arithmetic shows up as ``nll_reasoning`` rising faster than ``nll_other``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # [nll, tokens, nll_reasoning, tokens_reasoning], summed over sequences (and ranks).
        self.add_state("sums", default=torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, reasoning_mask: torch.Tensor) -> None:
        """`labels` and `reasoning_mask` are aligned with the model inputs, as `encode_solution` makes them."""
        self.sums += sequence_nll(logits, labels, reasoning_mask).sum(0)

    def compute(self) -> dict[str, torch.Tensor]:
        return summarise_nll(self.sums)


def token_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL(teacher || student) at `temperature`, one value per labelled position (1-D, fp32 or wider).

    Positions follow `token_nll`: position t predicts the token at t + 1 and counts where
    ``labels[:, t + 1] != -100``. Only those rows are softmaxed, so a prompt-masked batch of a
    150k-token vocabulary costs its answer tokens, not its whole length.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher/student logits: shapes differ ({tuple(teacher_logits.shape)} vs {tuple(student_logits.shape)}); "
            "the reference model must share the tokenizer and vocabulary"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    valid = labels[:, 1:] != IGNORE_INDEX
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # half-precision logits lose small KLs
    teacher = F.log_softmax(teacher_logits[:, :-1][valid].to(dtype) / temperature, dim=-1)
    student = F.log_softmax(student_logits[:, :-1][valid].to(dtype) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)


class KLToReference(Metric):
    """Teacher-forced mean KL(reference || model) per token: how far a pruned model drifted from the dense one.

    Unlike the CoT NLL of gold text, it cannot be lowered by learning a dataset's format: it is 0 only
    where the model predicts exactly what the dense model predicted.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("kl_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, reference_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        kl = token_kl(reference_logits, logits, labels)
        self.kl_sum += kl.double().sum()
        self.tokens += kl.numel()

    def compute(self) -> torch.Tensor:
        return (self.kl_sum / self.tokens).float() if self.tokens > 0 else torch.tensor(float("nan"))


class TextPerplexity(Perplexity):
    """torchmetrics `Perplexity` taking HF-style labels (aligned with inputs, -100 ignored)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(ignore_index=IGNORE_INDEX, **kwargs)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        super().update(logits[:, :-1].float(), labels[:, 1:])
