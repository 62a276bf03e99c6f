"""`StructuredPruner`: calibrate (accumulate statistics), then prune (mask) toward a sparsity.

Masks live in `StructureGates` attached to the model (`model.rku_gates`), so that `compact(model)`
and `save_pruned` need nothing but the model. Sparsity is the fraction of decoder-layer parameters
removed (embeddings, final norm and LM head excluded), always counted against the *dense* model:
on a model that was compacted before (an export, or `compact` in this process), the structures
its pruning plan already removed count as removed, and its earlier rounds stay in the history.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from rku_lightning.checks import fraction

from .allocation import (
    LayerOffer,
    fill_pool,
    group_steps,
    head_slice_steps,
    max_removable,
    mlp_steps,
)
from .checkpointing import checkpointed_layers
from .families import LayerView, get_family, unwrap_model
from .gates import StructureGates
from .importance import Importance
from .objectives import ObjectiveName, get_objective, scored_tokens
from .settings import Allocation, Attention, PruningSettings
from .statistics import CalibrationStatistics
from .structures import base_param_count, head_param_count, kv_param_count, unit_param_counts

#: A layer's dense counts: MLP channels, query heads, KV groups.
Counts = tuple[int, int, int]


@dataclass
class LayerReport:
    layer: int
    mlp_channels: int
    mlp_channels_total: int
    heads: int
    heads_total: int
    kv_groups: int
    kv_groups_total: int


@dataclass
class PruneReport:
    """What a pruning step left: sparsity, parameter counts, KV-cache size and per-layer kept counts."""

    target_sparsity: float
    sparsity: float
    total_sparsity: float
    decoder_params_before: int
    decoder_params_after: int
    total_params_before: int
    total_params_after: int
    kv_cache_bytes_per_token_before: int
    kv_cache_bytes_per_token_after: int
    importance: str
    allocation: str
    objective: str
    attention: str
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"importance={self.importance} allocation={self.allocation} objective={self.objective} attention={self.attention}",
            f"decoder sparsity {self.sparsity:.2%} (target {self.target_sparsity:.2%}); of all parameters {self.total_sparsity:.2%}",
            f"parameters {self.total_params_before:,} -> {self.total_params_after:,}",
            f"KV cache bytes/token {self.kv_cache_bytes_per_token_before:,} -> {self.kv_cache_bytes_per_token_after:,}",
            "layer  mlp kept        heads  kv groups",
        ]
        for r in self.layers:
            lines.append(
                f"{r.layer:5d}  {r.mlp_channels:5d}/{r.mlp_channels_total:<6d} {r.heads:3d}/{r.heads_total:<3d} "
                f"{r.kv_groups:3d}/{r.kv_groups_total}"
            )
        return "\n".join(lines)


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Scoring needs gate gradients only: no weight-gradient memory, whatever the caller set."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class StructuredPruner:
    """Scores MLP channels and attention groups/heads of a causal LM and masks the weakest ones.

    Args:
        model: a supported Hugging Face causal LM (Llama, Mistral, Qwen2), optionally peft-wrapped.
        importance: a registered method name (`rku`, `kinetic`, `taylor`, `magnitude`, `wanda_sp`,
            `flap`, `random`) or an `Importance` instance.
        allocation: `global` (one ranking across layers per structure type; attention takes its
            proportional share), `uniform` (the same counts in every layer) or `joint` (one ranking
            across layers and types by score per parameter: the scores decide the attention/MLP split).
        objective: `ce` or `hidden` (gradient methods only).
        attention: `groups` (remove KV groups with their query heads; shrinks the KV cache) or
            `query_heads` (remove query heads, the same number from every group of a layer) or `none`
            (MLP channels only: separates where a method puts its MLP budget from what attention costs).
        min_mlp_keep: fraction of each layer's MLP channels that always stays.
        micro_batch_size: split calibration batches to bound activation memory.
        checkpoint_layers: recompute decoder-layer activations in the backward pass of gradient scoring
            (exact gradients, a fraction of the activation memory, one more forward pass of compute).
        seed: seed of a named importance (only `random` draws from it).
        progress: show tqdm bars.

    The arguments (all but `model` and `progress`) are validated as one `PruningSettings`, kept as
    `self.settings`; `from_settings` builds a pruner from one.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        importance: str | Importance = "rku",
        allocation: Allocation = "uniform",
        objective: ObjectiveName = "ce",
        attention: Attention = "groups",
        min_mlp_keep: float = 0.1,
        micro_batch_size: int | None = None,
        seed: int = 0,
        checkpoint_layers: bool = False,
        progress: bool = True,
    ):
        self.settings = PruningSettings(
            importance, allocation, objective, attention, min_mlp_keep, micro_batch_size, seed, checkpoint_layers
        )
        self.importance = self.settings.build_importance()
        self.objective = get_objective(self.settings.objective)
        self.progress = progress
        self.model = unwrap_model(model)
        if any(p.is_meta for p in self.model.parameters()):
            raise ValueError(
                "model: its weights are on the meta device (built without loading them, e.g. under init_empty_weights); "
                "load the model with its weights, or to_empty() it and load a state dict, before pruning"
            )
        self.family = get_family(self.model)
        gates = getattr(self.model, "rku_gates", None)
        if gates is None:
            gates = StructureGates(self.family)
            self.model.rku_gates = gates
        self.gates: StructureGates = gates
        self.gates.attach()
        self.stats = CalibrationStatistics()
        self.history: list[PruneReport] = []
        plan = getattr(self.model, "rku_pruning_plan", None)
        #: Rounds of earlier pruning that the model's plan records (an export pruned again).
        self.earlier_rounds: list[dict] = list((plan or {}).get("rounds", []))
        views = self.family.views()
        self._dense = [self._dense_counts(view, plan) for view in views]
        compacted = [self._compacted_params(view) for view in views]
        self._layer_dense = [base_param_count(view.layer) + c for view, c in zip(views, compacted)]
        self._decoder_total = sum(self._layer_dense)
        self._model_total = base_param_count(self.model) + sum(compacted)

    @staticmethod
    def _dense_counts(view: LayerView, plan: dict | None) -> Counts:
        if plan is None:
            return view.num_channels, view.num_heads, view.num_groups
        original = plan["original"]
        return original["intermediate_size"], original["num_attention_heads"], original["num_key_value_heads"]

    def _compacted_params(self, view: LayerView) -> int:
        """Parameters an earlier compaction removed from this layer (structure costs do not depend on widths)."""
        channels, heads, groups = self._dense[view.index]
        return (
            (channels - view.num_channels) * int(unit_param_counts(view, "mlp")[0])
            + (heads - view.num_heads) * head_param_count(view)
            + (groups - view.num_groups) * kv_param_count(view)
        )

    @classmethod
    def from_settings(cls, model: torch.nn.Module, settings: PruningSettings, progress: bool = True) -> StructuredPruner:
        return cls(model, **settings.as_kwargs(), progress=progress)

    # -- calibration -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget accumulated statistics (masks stay)."""
        self.stats.reset()

    def calibrate(self, batches: Iterable[dict[str, torch.Tensor]], max_batches: int | None = None) -> int:
        """Accumulate statistics over `batches` (dicts with input_ids, attention_mask[, labels]); returns the count."""
        self.gates.attach()
        device = next(self.model.parameters()).device
        seen, scored, attended = 0, 0, 0
        iterator = tqdm(batches, desc=f"calibrate ({self.importance.name})", total=max_batches, disable=not self.progress)
        with frozen_parameters(self.model), eval_mode(self.model):
            for batch in iterator:
                if max_batches is not None and seen >= max_batches:
                    break
                if self.importance.needs_calibration:
                    for micro in self._micro_batches(batch, device):
                        self._accumulate(micro)
                        objective_tokens, mask_tokens = scored_tokens(self.settings.objective, micro)
                        scored += objective_tokens if self.importance.needs_gradients else mask_tokens
                        attended += mask_tokens
                seen += 1
        if seen == 0:
            raise ValueError("batches is empty: calibrate() needs at least one batch of input_ids/attention_mask")
        if self.importance.needs_calibration and scored == 0:
            cause = (
                "every attention_mask is 0: give batches with unmasked tokens"
                if attended == 0
                else "every label is -100, so the ce objective has nothing to predict: unmask some labels or use objective='hidden'"
            )
            raise ValueError(f"calibration scored no token in {seen} batches ({cause}); every score would be zero")
        return seen

    def _micro_batches(self, batch: dict, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        if "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError(f"calibration batches need input_ids and attention_mask, got keys {sorted(batch)}")
        keys = [k for k in ("input_ids", "attention_mask", "labels") if k in batch]
        size = batch["input_ids"].shape[0]
        step = self.settings.micro_batch_size or size
        for start in range(0, size, step):
            yield {k: batch[k][start : start + step].to(device) for k in keys}

    def _record(self, token_mask: torch.Tensor):
        return lambda source, layer, x: self.stats.add_activations(source, layer, x, token_mask)

    def _accumulate(self, batch: dict[str, torch.Tensor]) -> None:
        self.gates.recorder = self._record(batch["attention_mask"])
        try:
            if not self.importance.needs_gradients:
                with torch.no_grad():
                    self.family.decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                return
            gates = self.gates.start_scoring(batch["input_ids"].shape[0], batch["input_ids"].device)
            checkpointing = (
                checkpointed_layers(self.family.decoder_layers(), self.gates.recording_paused)
                if self.settings.checkpoint_layers
                else contextlib.nullcontext()
            )
            with torch.enable_grad(), checkpointing:
                phi = self.objective(self.family, batch).sum()
                leaves = gates["mlp"] + gates["head"]
                grads = torch.autograd.grad(phi, leaves, allow_unused=True)
        finally:
            self.gates.recorder = None
            self.gates.stop_scoring()
        n = len(gates["mlp"])
        for i, view in enumerate(self.family.views()):
            g_mlp = grads[i] if grads[i] is not None else torch.zeros_like(gates["mlp"][i])
            g_heads = grads[n + i] if grads[n + i] is not None else torch.zeros_like(gates["head"][i])
            self.stats.add_gradients("mlp", i, g_mlp)
            self.stats.add_gradients("head", i, g_heads)
            self.stats.add_gradients("group", i, g_heads.view(g_heads.shape[0], view.num_groups, -1).sum(-1))

    # -- pruning ---------------------------------------------------------------------------------
    def _alive(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mlp = self.gates.mlp[view.index].cpu() > 0
        heads = self.gates.heads[view.index].cpu() > 0
        groups = heads.view(view.num_groups, view.heads_per_group).any(1)
        return mlp, heads, groups

    def _offer(self, view: LayerView, with_scores: bool) -> LayerOffer:
        mlp_alive, heads_alive, groups_alive = self._alive(view)
        dense_channels, dense_heads, dense_groups = self._dense[view.index]
        channel_cost = float(unit_param_counts(view, "mlp")[0])
        head_cost, kv_cost = float(head_param_count(view)), float(kv_param_count(view))
        group_cost = kv_cost + view.heads_per_group * head_cost
        attention_mode = self.settings.attention
        floor = max(1, math.ceil(self.settings.min_mlp_keep * dense_channels))
        if attention_mode == "groups":
            kind, alive = "group", groups_alive
            attention_limit = max(0, int(groups_alive.sum()) - 1)
        elif attention_mode == "query_heads":
            kind, alive = "head", heads_alive
            per_group = heads_alive.view(view.num_groups, view.heads_per_group).sum(1)
            attention_limit = max(0, int(per_group[groups_alive].min()) - 1) if bool(groups_alive.any()) else 0
        else:
            kind, alive, attention_limit = "head", heads_alive, 0
        dense_attention = dense_heads * head_cost + dense_groups * kv_cost
        mlp: list = []
        attention: list = []
        if with_scores:
            mlp_scores = self.importance.layer_scores(view, "mlp", self.stats, mlp_alive).cpu().double()
            mlp = mlp_steps(view.index, mlp_scores, mlp_alive, channel_cost)
            if attention_limit > 0:
                attn_scores = self.importance.layer_scores(view, kind, self.stats, alive).cpu().double()
                if attention_mode == "groups":
                    attention = group_steps(view.index, attn_scores, groups_alive, view.heads_per_group, group_cost)
                else:
                    attention = head_slice_steps(view.index, attn_scores, heads_alive, view.heads_per_group, head_cost)
        return LayerOffer(
            layer=view.index,
            mlp=mlp,
            mlp_limit=max(0, int(mlp_alive.sum()) - floor),
            attention=attention,
            attention_limit=attention_limit,
            mlp_step_cost=channel_cost,
            attention_step_cost=group_cost if attention_mode == "groups" else view.num_groups * head_cost,
            removable_params=dense_channels * channel_cost + dense_attention,
            attention_params=dense_attention,
            dead_mlp_params=float(dense_channels - int(mlp_alive.sum())) * channel_cost,
            dead_attention_params=float(dense_heads - int(heads_alive.sum())) * head_cost
            + float(dense_groups - int(groups_alive.sum())) * kv_cost,
        )

    def _removed_params(self) -> float:
        total = 0.0
        for view in self.family.views():
            offer = self._offer(view, with_scores=False)
            total += offer.dead_mlp_params + offer.dead_attention_params
        return total

    def sparsity(self) -> float:
        """Fraction of decoder-layer parameters removed so far."""
        return self._removed_params() / self._decoder_total

    def _pools(self, offers: list[LayerOffer]) -> list[tuple[list[LayerOffer], float]]:
        """The pools that each meet the budget, with the parameters it is a fraction of."""
        if self.settings.allocation == "uniform":
            return [([o], float(self._layer_dense[o.layer])) for o in offers]
        return [(offers, float(self._decoder_total))]

    def check_reachable(self, sparsity: float, name: str = "sparsity", offers: list[LayerOffer] | None = None) -> None:
        """Raise ValueError (naming `name`) when the min-keep rules cannot reach `sparsity` in every pool."""
        if offers is None:
            offers = [self._offer(view, with_scores=False) for view in self.family.views()]
        for pool, pool_total in self._pools(offers):
            reachable = max_removable(pool)
            if reachable < sparsity * pool_total - min(o.mlp_step_cost for o in pool) / 2:
                raise ValueError(
                    f"{name}={sparsity} is unreachable: min_mlp_keep={self.settings.min_mlp_keep} and one attention group "
                    f"per layer cap it at {reachable / pool_total:.4f} ({self.settings.allocation} allocation); "
                    f"lower {name} or min_mlp_keep"
                )

    def prune(self, sparsity: float) -> PruneReport:
        """Mask structures until `sparsity` of the decoder-layer parameters are removed (never revives)."""
        fraction("sparsity", sparsity)
        if self.importance.needs_gradients and not self.stats.has_gradients or (
            self.importance.needs_activations and not self.stats.has_activations
        ):
            raise RuntimeError(
                f"importance={self.importance.name!r} needs calibration statistics: call calibrate(batches) before prune()"
            )
        current = self.sparsity()
        if sparsity < current - 1e-9:
            raise ValueError(
                f"sparsity {sparsity:.4f} is below the {current:.4f} already pruned; pruning never revives structures"
            )
        self.gates.attach()
        offers = [self._offer(view, with_scores=True) for view in self.family.views()]
        self.check_reachable(sparsity, offers=offers)
        joint = self.settings.allocation == "joint"
        plans = [fill_pool(pool, sparsity * pool_total, joint=joint) for pool, pool_total in self._pools(offers)]
        for plan in plans:
            for layer, channels in plan.channels.items():
                self.gates.mlp[layer][channels] = 0.0
            for layer, heads in plan.heads.items():
                self.gates.heads[layer][heads] = 0.0
        report = self.report(target_sparsity=sparsity)
        self.history.append(report)
        self.gates.info = {
            "importance": self.importance.name,
            "allocation": self.settings.allocation,
            "objective": self.settings.objective,
            "attention": self.settings.attention,
            "calibration_samples": self.stats.num_samples(),
            "rounds": self.earlier_rounds + [self._round(r) for r in self.history],
        }
        return report

    @staticmethod
    def _round(report: PruneReport) -> dict:
        """One round as `pruning.json` keeps it (read off the report, so a resumed pruner rebuilds it too)."""
        keys = ("target_sparsity", "sparsity", "importance", "allocation", "objective", "attention")
        return {key: getattr(report, key) for key in keys}

    def max_sparsity(self) -> float:
        """The highest sparsity the min-keep rules allow (global allocation)."""
        return max_removable([self._offer(v, with_scores=False) for v in self.family.views()]) / self._decoder_total

    # -- reporting and state ---------------------------------------------------------------------
    def report(self, target_sparsity: float | None = None) -> PruneReport:
        removed = self._removed_params()
        views = self.family.views()
        bytes_per = next(self.model.parameters()).element_size()
        layers, kv_before, kv_after = [], 0, 0
        for view in views:
            mlp, heads, groups = self._alive(view)
            channels, num_heads, num_groups = self._dense[view.index]
            layers.append(LayerReport(view.index, int(mlp.sum()), channels, int(heads.sum()), num_heads, int(groups.sum()), num_groups))
            kv_before += 2 * num_groups * view.head_dim * bytes_per
            kv_after += 2 * int(groups.sum()) * view.head_dim * bytes_per
        return PruneReport(
            target_sparsity=self.sparsity() if target_sparsity is None else target_sparsity,
            sparsity=removed / self._decoder_total,
            total_sparsity=removed / self._model_total,
            decoder_params_before=self._decoder_total,
            decoder_params_after=int(self._decoder_total - removed),
            total_params_before=self._model_total,
            total_params_after=int(self._model_total - removed),
            kv_cache_bytes_per_token_before=kv_before,
            kv_cache_bytes_per_token_after=kv_after,
            importance=self.importance.name,
            allocation=self.settings.allocation,
            objective=self.settings.objective,
            attention=self.settings.attention,
            layers=layers,
        )

    def state_dict(self) -> dict:
        return {"masks": self.gates.state_dict(), "stats": self.stats.state_dict(), "history": [r.to_dict() for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.gates.load_state_dict(state["masks"])
        self.stats.load_state_dict(state["stats"])
        self.history = [
            PruneReport(**{**r, "layers": [LayerReport(**layer) for layer in r["layers"]]}) for r in state["history"]
        ]
