"""Iterative RKU pruning with LoRA recovery, end to end: `python train.py [--config configs/X.yaml] [--a.b=value ...]`.

With no `--config`, configs/demo.yaml runs: the main job (embedded Qwen2.5-Coder-0.5B, local data, under
10 minutes on 2 CPU cores; configs/smoke.yaml is a one-minute check on SmolLM2-135M). Every argument can be
overridden on the command line; `--print_config` shows the result. Outputs go to `<output_root>/<run_name>/`:
Lightning logs (csv/, tensorboard/), checkpoints/ (`round-end.ckpt`, the latest round; resume with
`--ckpt_path`), report.json, report.md, sparsity_curve.png, layer_profile.png, the compacted model (model/)
and the summary printed at the end (summary.txt, summary.json; `training.summary`).

The optimizer is `CausalLMPruningModule`'s (AdamW over the LoRA adapters that exist only after
`RKUPruning.setup`; `--model.lr`, `--model.weight_decay`), so LightningCLI's `--optimizer` and
`--lr_scheduler` are not offered. A SIGTERM (a cluster's time limit) ends the job with exit status
143 and says which checkpoint to resume from.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rku_lightning.callbacks import RKUPruning
from rku_lightning.evaluation.speed import compare_decode
from rku_lightning.loading import load_causal_lm
from rku_lightning.training.datamodule import ReasoningDataModule
from rku_lightning.training.lightning_module import CausalLMPruningModule
from rku_lightning.training.summary import format_summary, summarize, write_summary

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
#: LightningCLI options this script does not offer, and why.
NOT_OFFERED = {
    "--optimizer": "the optimizer is CausalLMPruningModule's AdamW over the LoRA adapters RKUPruning injects at "
                   "setup (after LightningCLI would build one); set --model.lr and --model.weight_decay",
    "--lr_scheduler": "the learning rate is constant within each round's recovery (--model.lr); "
                      "no scheduler is offered",
}
#: Exit status of a job ended by SIGTERM (128 + 15, what a shell reports), so a scheduler sees a failure.
SIGTERM_EXIT = 143


def _component(class_path: str, **init_args) -> Namespace:
    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


class RKUCLI(LightningCLI):
    """LightningCLI with the pruning callback as its own `pruning:` section and run-folder defaults."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RKUPruning, "pruning")
        parser.add_argument("--run_name", type=str, default="demo", help="outputs go to <output_root>/<run_name>")
        parser.add_argument("--output_root", type=str, default="outputs")
        parser.add_argument("--evaluate_dense", type=bool, default=True, help="validate the dense model first (round 0)")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume from this checkpoint")
        parser.add_argument("--speed_tokens", type=int, default=32,
                            help="decode this many tokens with the dense and the pruned model at the end, for the summary (0: skip)")

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        out = Path(cfg.output_root) / cfg.run_name
        cfg.pruning.report_dir = cfg.pruning.report_dir or str(out)
        cfg.pruning.export_dir = cfg.pruning.export_dir or str(out / "model")
        trainer = cfg.trainer
        trainer.default_root_dir = trainer.default_root_dir or str(out)
        if trainer.logger in (None, True):
            trainer.logger = [
                _component("lightning.pytorch.loggers.CSVLogger", save_dir=str(out), name="csv"),
                _component("lightning.pytorch.loggers.TensorBoardLogger", save_dir=str(out), name="tensorboard"),
            ]
        callbacks = list(trainer.callbacks or [])
        if trainer.enable_progress_bar is not False and not any("ProgressBar" in str(c.class_path) for c in callbacks):
            callbacks.append(_component("rku_lightning.callbacks.RKUProgressBar"))
        if trainer.enable_checkpointing is not False and not any("ModelCheckpoint" in str(c.class_path) for c in callbacks):
            # Round ends (validation ends) are the resumable points: keep the latest as round-end.ckpt.
            # After the last round it holds the compacted model and its plan (load_from_checkpoint, not resume).
            checkpoint = dict(dirpath=str(out / "checkpoints"), filename="round-end", save_top_k=1)
            callbacks.append(_component("lightning.pytorch.callbacks.ModelCheckpoint", **checkpoint))
        trainer.callbacks = callbacks


def dense_table(results: list[dict[str, float]], ood_task: str) -> str:
    """The dense model's validation, one line per set (`trainer.validate`'s results, one dict per dataloader).

    Each dict holds only its set's metrics: the module logs a set's metrics during that set's batches, and
    the callback its `prune/*` during the first batch, so Lightning files them under one dataloader; those
    (round 0, sparsity 0) say nothing about the dense model and are left out.
    """
    lines = ["dense model (round 0):"]
    for task, metrics in zip(("gsm8k", ood_task), results):
        shown = {k: v for k, v in metrics.items() if not k.startswith("prune/")}
        lines += [f"  {task}: " + ", ".join(f"{k}={float(v):.4f}" for k, v in sorted(shown.items()))] if shown else []
    return "\n".join(lines)


def make_cli(args: list[str] | None = None) -> RKUCLI:
    """Parse `args` (default: the command line) and build model, data and Trainer; nothing runs yet."""
    argv = sys.argv[1:] if args is None else args
    for arg in argv:
        option = arg.split("=", 1)[0].split(".", 1)[0]
        if option in NOT_OFFERED:
            raise SystemExit(f"train.py: {option} is not available: {NOT_OFFERED[option]}")
    has_config = any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)
    return RKUCLI(
        CausalLMPruningModule,
        ReasoningDataModule,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # No abbreviations: `--pruning.recovery_step` must be an error, as the same typo in a YAML file is.
        parser_kwargs={"allow_abbrev": False, **({} if has_config else {"default_config_files": [str(DEFAULT_CONFIG)]})},
    )


def _dense_model(module: CausalLMPruningModule):
    """The dense model to time against: the module's frozen teacher when it matches the student's dtype, else a fresh load."""
    teacher = module.teacher
    student = next(module.model.parameters())
    if teacher is not None and next(teacher.model.parameters()).dtype == student.dtype:
        return teacher.model.to(student.device)
    dense, _ = load_causal_lm(module.hparams.pretrained, dtype=student.dtype)
    return dense.to(student.device)


def run_summary(cli: RKUCLI, seconds: float) -> dict | None:
    """What the run removed, kept and gained (see `training.summary`), printed and saved beside the report."""
    pruning = next((c for c in cli.trainer.callbacks if isinstance(c, RKUPruning)), None)
    if pruning is None or not any(r["round"] > 0 for r in pruning.records) or not cli.trainer.is_global_zero:
        return None
    data, module = cli.datamodule, cli.model
    sets = {"val/gsm8k_acc": (data.hparams.val_task, len(data.val_set or ()))}
    if data.ood_set is not None:
        sets["val/ood_acc"] = (data.hparams.ood_task, len(data.ood_set))
    speed = None
    if cli.config.speed_tokens > 0 and pruning.plan is not None:  # compacted: the exported model itself
        speed = compare_decode({"dense": _dense_model(module), "pruned": module.model}, module.tokenizer, cli.config.speed_tokens)
    summary = summarize(
        pruning.records, sets, speed, seconds, str(pruning.export_dir) if pruning.export_dir else None,
        str(pruning.report_dir) if pruning.report_dir else None, pruning.phase == "done", pruning.settings.allocation,
        data.trace_records,
    )
    if pruning.report_dir is not None:
        write_summary(summary, pruning.report_dir)
    print(format_summary(summary))
    return summary


def main(args: list[str] | None = None) -> RKUCLI:
    cli = make_cli(args)
    ckpt_path = cli.config.ckpt_path
    started = time.perf_counter()
    try:
        if cli.config.evaluate_dense and ckpt_path is None:
            results = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
            if cli.trainer.is_global_zero:
                print(dense_table(results, cli.datamodule.hparams.get("ood_task") or "ood"))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        checkpoint = cli.trainer.checkpoint_callback
        latest = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
        where = f"resume with --ckpt_path {latest}" if latest else "no checkpoint was written yet: rerun from the start"
        print(f"train.py: stopped by SIGTERM at step {cli.trainer.global_step}; nothing was exported; {where}", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    run_summary(cli, time.perf_counter() - started)
    return cli


if __name__ == "__main__":
    main()
