"""`ReasoningDataModule`: GSM8K-style data for prune-and-recover runs.

- train: an endless stream of prompt-masked chain-of-thought batches (recovery data). Batch k of
  rank r holds the examples at positions ((k * W + r) * B ...) of one seeded permutation, and the
  stream starts at the run's current step, so a resumed run sees the same batches as an
  uninterrupted one and DDP ranks see disjoint data without a sampler.
- calibration: a fixed, seeded sample of solutions (or questions only, for `objective="hidden"`),
  read by `RKUPruning` through `calibration_dataloader()`.
- validation: dataloader 0 is a fixed subset of the in-distribution test set (greedy answers and
  CoT NLL), dataloader 1 an out-of-distribution set such as SVAMP (greedy answers).
The tokenizer is the LightningModule's `tokenizer` unless one is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from rku_lightning.checks import one_of, positive_int
from rku_lightning.evaluation.calibration import calibration_batches
from rku_lightning.evaluation.data import TASKS, Problem, Task, load_problems
from rku_lightning.evaluation.generation import PromptDataset, collate_prompts
from rku_lightning.evaluation.prompts import build_prompt, collate_left, encode_solution
from rku_lightning.paths import shared_data_dir

CalibrationText = Literal["solutions", "questions"]
CALIBRATION_TEXTS: tuple[str, ...] = get_args(CalibrationText)
#: Room the solution needs after the prompt; longer prompts are dropped from training data.
MIN_SOLUTION_TOKENS = 32


def _looks_local(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else is a path that must exist."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or source.endswith(".jsonl")


def _check_source(field: str, source: str | None, task: str | None) -> None:
    if task is not None:
        one_of(field.replace("_data", "_task"), task, TASKS)
    if source is not None and _looks_local(source) and not Path(source).expanduser().exists():
        raise ValueError(f"{field}: {source} does not exist (give a local JSONL file or folder, or a hub dataset id)")


def stream_position(trainer: Trainer | None) -> tuple[int, int, int]:
    """(micro-batches this run has trained on, rank, world size): where a `RecoveryStream` starts."""
    if trainer is None:
        return 0, 0, 1
    return trainer.global_step * trainer.accumulate_grad_batches, trainer.global_rank, trainer.world_size


class RecoveryStream(IterableDataset):
    """Endless training batches; batch k of rank r is a pure function of (k, r), see the module docstring.

    `problems` can be any items that `encode` turns into dicts of 1-D tensors (`collate_left` pads them).
    """

    def __init__(
        self,
        problems: Sequence[Any],
        encode: Callable[[Any], dict[str, torch.Tensor]],
        batch_size: int,
        pad_token_id: int,
        seed: int,
        position: Callable[[], tuple[int, int, int]],
    ):
        self.problems = problems
        self.encode = encode
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed)).tolist()
        self.position = position  # -> (first micro-batch index, rank, world size)

    def batch(self, step: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        base = (step * world + rank) * self.batch_size
        items = [self.problems[self.order[(base + j) % len(self.order)]] for j in range(self.batch_size)]
        return collate_left([self.encode(p) for p in items], self.pad_token_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step, rank, world = self.position()
        info = get_worker_info()
        # DataLoader workers take turns, so worker w makes every n-th batch and the order is kept.
        if info is not None:
            step += info.id
        stride = 1 if info is None else info.num_workers
        while True:
            yield self.batch(step, rank, world)
            step += stride


class _SolutionSet(Dataset):
    """Validation items: prompt and answer for generation, the encoded gold solution for CoT NLL."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], max_length: int):
        self.items = []
        for p in problems:
            encoded = encode_solution(tokenizer, p, max_length)
            self.items.append({"prompt": build_prompt(tokenizer, p.question), "answer": p.answer, "index": p.index, **encoded})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _collate_solutions(pad_token_id: int) -> Callable[[Sequence[dict]], dict[str, Any]]:
    tensor_keys = ("input_ids", "attention_mask", "labels", "reasoning_mask")

    def collate(items: Sequence[dict]) -> dict[str, Any]:
        batch = collate_left([{k: item[k] for k in tensor_keys} for item in items], pad_token_id)
        return {**batch, **{key: [item[key] for item in items] for key in ("prompt", "answer", "index")}}

    return collate


class ReasoningDataModule(LightningDataModule):
    """GSM8K-style train / calibration / validation / OOD loaders (see the module docstring).

    Data sources are a local JSONL file, a folder with `{split}.jsonl`, or a hub dataset id; `None`
    means the task's folder under `shared_data_dir()`. `ood_task=None` drops the OOD set; `ood_fields`
    (`question_field`, `answer_field`, `solution_field`) maps a hub copy's column names.
    """

    def __init__(
        self,
        train_data: str | None = None,
        train_task: Task = "gsm8k",
        train_split: str = "train",
        val_data: str | None = None,
        val_task: Task = "gsm8k",
        val_split: str = "test",
        val_limit: int | None = 64,
        ood_data: str | None = None,
        ood_task: Task | None = "svamp",
        ood_split: str = "test",
        ood_limit: int | None = 64,
        ood_fields: dict[str, str] | None = None,
        calibration_data: str | None = None,
        calibration_split: str | None = None,
        calibration_text: CalibrationText = "solutions",
        calibration_samples: int = 128,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        max_length: int = 384,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: Any = None,
    ):
        super().__init__()
        for field, source, task in (
            ("train_data", train_data, train_task),
            ("val_data", val_data, val_task),
            ("ood_data", ood_data, ood_task),
            ("calibration_data", calibration_data, None),
        ):
            _check_source(field, source, task)
        one_of("calibration_text", calibration_text, CALIBRATION_TEXTS)
        for field, value in (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("max_length", max_length),
            ("calibration_samples", calibration_samples),
        ):
            positive_int(field, value)
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.train_problems: list[Problem] = []
        self.calibration_problems: list[Problem] = []
        self.val_set: Dataset | None = None
        self.ood_set: Dataset | None = None

    def _source(self, source: str | None, task: str) -> str:
        if source is not None:
            return source
        folder = shared_data_dir() / task
        if not folder.is_dir():
            raise ValueError(f"no data given for task {task!r} and {folder} does not exist; set RKU_SHARED_DATA or a *_data path")
        return str(folder)

    def _fits(self, problems: Sequence[Problem], field: str) -> list[Problem]:
        """Problems whose prompt leaves room for a solution within max_length (the rest are dropped, with a warning)."""
        limit = self.hparams.max_length - MIN_SOLUTION_TOKENS
        prompts = [build_prompt(self.tokenizer, p.question) for p in problems]
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        kept = [p for p, n in zip(problems, lengths) if n <= limit]
        if not kept:
            raise ValueError(f"max_length={self.hparams.max_length} is too short for every prompt of {field}")
        if len(kept) < len(problems):
            warnings.warn(f"{field}: dropped {len(problems) - len(kept)} problems whose prompt exceeds max_length - {MIN_SOLUTION_TOKENS}")
        return kept

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError("ReasoningDataModule needs a tokenizer: pass tokenizer= or give the LightningModule a `tokenizer`")
        hp = self.hparams
        if stage in (None, "fit") and not self.train_problems:
            train = load_problems(self._source(hp.train_data, hp.train_task), hp.train_task, split=hp.train_split)
            self.train_problems = self._fits([p for p in train if p.solution], "train_data")
            if hp.calibration_data is None:
                self.calibration_problems = self.train_problems
            else:
                calib = load_problems(hp.calibration_data, hp.train_task, split=hp.calibration_split or hp.train_split)
                self.calibration_problems = self._fits(list(calib), "calibration_data")
        if stage in (None, "fit", "validate") and self.val_set is None:
            val = load_problems(self._source(hp.val_data, hp.val_task), hp.val_task, split=hp.val_split, limit=hp.val_limit)
            self.val_set = _SolutionSet(self.tokenizer, self._fits(list(val), "val_data"), hp.max_length)
            if hp.ood_task is not None:
                ood = load_problems(
                    self._source(hp.ood_data, hp.ood_task), hp.ood_task, split=hp.ood_split, limit=hp.ood_limit, **(hp.ood_fields or {})
                )
                self.ood_set = PromptDataset(self.tokenizer, list(ood))

    def _encode_train(self, problem: Problem) -> dict[str, torch.Tensor]:
        encoded = encode_solution(self.tokenizer, problem, self.hparams.max_length)
        return {k: encoded[k] for k in ("input_ids", "attention_mask", "labels")}

    def train_dataloader(self) -> DataLoader:
        stream = RecoveryStream(
            self.train_problems,
            self._encode_train,
            self.hparams.batch_size,
            self.tokenizer.pad_token_id,
            self.hparams.seed,
            lambda: stream_position(self.trainer),
        )
        return DataLoader(stream, batch_size=None, num_workers=self.hparams.num_workers)

    def calibration_dataloader(self) -> list[dict[str, torch.Tensor]]:
        """Fixed calibration batches (seeded sample); `RKUPruning` takes the first `calibration_batches`."""
        hp = self.hparams
        return calibration_batches(
            self.tokenizer,
            self.calibration_problems,
            samples=hp.calibration_samples,
            batch_size=hp.batch_size,
            max_length=hp.max_length,
            questions_only=hp.calibration_text == "questions",
            seed=hp.seed,
        )

    def val_dataloader(self) -> list[DataLoader]:
        hp = self.hparams
        assert self.val_set is not None
        loaders = [
            DataLoader(self.val_set, batch_size=hp.eval_batch_size, collate_fn=_collate_solutions(self.tokenizer.pad_token_id))
        ]
        if self.ood_set is not None:
            loaders.append(DataLoader(self.ood_set, batch_size=hp.eval_batch_size, collate_fn=collate_prompts))
        return loaders
