"""Batched greedy generation with left padding and a KV cache, standalone or inside a Lightning loop.

`generate_batch` does one batch and is what a LightningModule's ``validation_step`` calls; a
`PromptDataset` with a ``DistributedSampler`` shards the questions across ranks and the metrics'
sum states sync the results. `generate_answers` runs a whole list with a progress bar.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rku_lightning.checks import positive_int

from .data import Problem
from .prompts import build_prompt, encode_prompts, stop_strings

# Gold GSM8K solutions fit in well under 300 tokens, but chat models' own answers often do not (58 % of
# Qwen2.5-Coder-0.5B-Instruct's exceed 256): watch `truncated_rate` and raise the cap for such models.
DEFAULT_MAX_NEW_TOKENS = 320
# End-of-turn tokens of common chat templates: generation must stop there as well as at EOS.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS of the tokenizer and model plus any chat end-of-turn token the vocabulary has."""
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in (tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])):
        if value is not None and value not in ids:
            ids.append(int(value))
    vocab = tokenizer.get_vocab()
    for token in CHAT_END_TOKENS:
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    if not ids:
        raise ValueError("tokenizer: has no EOS token, so generation could never stop early")
    return ids


def _cut(text: str, stops: Sequence[str]) -> str:
    positions = [text.find(stop) for stop in stops if stop in text]
    return text[: min(positions)] if positions else text


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    eos_token_ids: Sequence[int] | None = None,
) -> tuple[list[str], list[int]]:
    """Greedy completions of one batch of prompts and the number of tokens each one generated.

    Deterministic (no sampling, eval mode for the call). The prompt is stripped; text after a
    plain-text stop string (a run-on next question) is cut.
    """
    positive_int("max_new_tokens", max_new_tokens)
    if not prompts:
        return [], []
    eos = list(eos_token_ids) if eos_token_ids is not None else stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    batch = encode_prompts(tokenizer, prompts).to(device)
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            **batch,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
            use_cache=True,
        )
    finally:
        model.train(was_training)
    new_tokens = output[:, batch["input_ids"].shape[1] :].cpu()
    is_stop = torch.isin(new_tokens, torch.tensor(eos))
    # Tokens up to and including the first stop token; after it the row holds only padding.
    lengths = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, new_tokens.shape[1]).tolist()
    stops = stop_strings(tokenizer)
    texts = [
        _cut(tokenizer.decode(row[:n], skip_special_tokens=True), stops).strip()
        for row, n in zip(new_tokens, lengths)
    ]
    return texts, lengths


def iter_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
) -> Iterator[tuple[list[str], list[int]]]:
    """`generate_batch` over consecutive batches, with a tqdm bar counting questions."""
    positive_int("batch_size", batch_size)
    eos = stop_token_ids(model, tokenizer)
    with tqdm(total=len(prompts), desc="generating", unit="q", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            yield generate_batch(model, tokenizer, chunk, max_new_tokens, eos)
            bar.update(len(chunk))


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of all `prompts`, in order."""
    texts: list[str] = []
    for batch_texts, _ in iter_generations(model, tokenizer, prompts, batch_size, max_new_tokens, progress):
        texts.extend(batch_texts)
    return texts


class PromptDataset(Dataset):
    """Problems as prompt items for a DataLoader (a DistributedSampler shards them across ranks)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], exemplars: Sequence[Problem] = ()):
        self.items = [
            {"prompt": build_prompt(tokenizer, p.question, exemplars), "answer": p.answer, "index": p.index}
            for p in problems
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        return self.items[position]


def collate_prompts(items: Sequence[dict]) -> dict[str, list]:
    """Keep prompts as strings: `generate_batch` tokenizes and pads them itself."""
    return {key: [item[key] for item in items] for key in ("prompt", "answer", "index")}
