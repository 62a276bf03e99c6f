"""Turn scores into removals under a parameter budget: `global` (one ranking across layers per
structure type), `uniform` (the same budget in every layer) or `joint` (one ranking across layers
*and* structure types, by score per parameter, so the scores decide the attention/MLP split).

Each layer offers, per type, an ordered list of removal *steps* (lowest score first): one MLP
channel, or one attention group, or (in `query_heads` mode) one query head from every group of the
layer so that all groups keep the same q-per-kv ratio. A pool of layers (all layers for `global`
and `joint`, one layer for `uniform`) fills its budget in three passes:

1. attention takes its proportional share of the budget (steps are coarse, so never more);
2. MLP channels fill the rest to the nearest channel;
3. if MLP hit its min-keep floor, attention takes more steps to land the budget.
A budget that the min-keep rules cannot reach is refused before any pass (`StructuredPruner.check_reachable`).

`joint` replaces pass 1 by one greedy pass over all steps in order of score per parameter
removed (the knapsack rule: cheapest loss per parameter first); passes 2 and 3 then land the
budget to the nearest channel. It only means something for scores on one scale across types.

Ties are broken by layer, then position, so plans are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Step:
    """One removal: its score, the parameters it deletes, and which structures go."""

    score: float
    cost: float
    layer: int
    channels: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    taken: bool = False


@dataclass
class LayerOffer:
    """A layer's candidate steps per type, sorted by score, with how many may be taken (min-keep)."""

    layer: int
    mlp: list[Step]
    mlp_limit: int
    attention: list[Step]
    attention_limit: int
    mlp_step_cost: float
    attention_step_cost: float
    removable_params: float  # MLP + attention structures of this layer, removed ones included
    attention_params: float  # attention structures of this layer, removed ones included
    dead_mlp_params: float  # removed in earlier rounds
    dead_attention_params: float


@dataclass
class Plan:
    """Structures to remove now, per layer, and the parameters removed in total (earlier rounds included)."""

    channels: dict[int, list[int]] = field(default_factory=dict)
    heads: dict[int, list[int]] = field(default_factory=dict)
    removed_params: float = 0.0


def _ascending(scores: torch.Tensor, alive: torch.Tensor) -> list[int]:
    idx = torch.nonzero(alive).flatten()
    return idx[torch.sort(scores[idx], stable=True).indices].tolist()


def mlp_steps(layer: int, scores: torch.Tensor, alive: torch.Tensor, cost: float) -> list[Step]:
    return [Step(float(scores[j]), cost, layer, channels=(j,)) for j in _ascending(scores, alive)]


def group_steps(layer: int, scores: torch.Tensor, alive: torch.Tensor, heads_per_group: int, cost: float):
    return [
        Step(float(scores[g]), cost, layer, heads=tuple(range(g * heads_per_group, (g + 1) * heads_per_group)))
        for g in _ascending(scores, alive)
    ]


def head_slice_steps(layer: int, scores: torch.Tensor, alive: torch.Tensor, heads_per_group: int, head_cost: float):
    """Step k removes the k-th weakest live head of every group; steps are ascending by construction."""
    per_group = []
    for g in range(scores.numel() // heads_per_group):
        in_group = torch.zeros_like(alive)
        in_group[g * heads_per_group : (g + 1) * heads_per_group] = True
        per_group.append(_ascending(scores, alive & in_group))
    depth = min(len(h) for h in per_group)
    return [
        Step(sum(float(scores[h[k]]) for h in per_group), head_cost * len(per_group), layer,
             heads=tuple(h[k] for h in per_group))
        for k in range(depth)
    ]


def _kind(step: Step) -> tuple[int, bool]:
    """Which per-layer limit a step counts against: (layer, is attention)."""
    return step.layer, bool(step.heads)


def _fill(steps: list[Step], limits: dict[tuple[int, bool], int], removed: float, target: float, nearest: bool) -> float:
    """Take steps in the given order while they fit the target (to the nearest step if `nearest`)."""
    taken = dict.fromkeys(limits, 0)
    for step in steps:
        taken[_kind(step)] += step.taken
    for step in steps:
        if step.taken or taken[_kind(step)] >= limits[_kind(step)]:
            continue
        if removed + step.cost > target + (step.cost / 2 if nearest else 0.0):
            continue
        step.taken = True
        taken[_kind(step)] += 1
        removed += step.cost
    return removed


def fill_pool(offers: list[LayerOffer], target: float, joint: bool = False) -> Plan:
    """Remove steps from these layers until `target` parameters (earlier removals included) are gone.

    `joint`: attention and MLP steps compete in one ranking by score per parameter instead of
    attention taking its proportional share.
    """
    # Python's sort is stable: equal scores keep layer-major, position-minor order.
    attention = sorted((s for o in offers for s in o.attention), key=lambda s: s.score)
    mlp = sorted((s for o in offers for s in o.mlp), key=lambda s: s.score)
    limits = {(o.layer, True): o.attention_limit for o in offers} | {(o.layer, False): o.mlp_limit for o in offers}
    dead = sum(o.dead_attention_params + o.dead_mlp_params for o in offers)

    if joint:
        removed = _fill(sorted(attention + mlp, key=lambda s: s.score / s.cost), limits, dead, target, False)
    else:
        removable = sum(o.removable_params for o in offers)
        share = min(1.0, target / removable) if removable else 0.0
        dead_attention = sum(o.dead_attention_params for o in offers)
        attention_removed = _fill(attention, limits, dead_attention, share * sum(o.attention_params for o in offers), False)
        removed = dead + attention_removed - dead_attention
    removed = _fill(mlp, limits, removed, target, True)
    removed = _fill(attention, limits, removed, target, True)  # only if MLP hit its floor

    plan = Plan(removed_params=removed)
    for step in attention + mlp:
        if step.taken:
            plan.channels.setdefault(step.layer, []).extend(step.channels)
            plan.heads.setdefault(step.layer, []).extend(step.heads)
    return plan


def max_removable(offers: list[LayerOffer]) -> float:
    """The most parameters the min-keep rules let these layers lose, earlier removals included."""
    return sum(
        o.dead_mlp_params + o.dead_attention_params + o.mlp_limit * o.mlp_step_cost
        + o.attention_limit * o.attention_step_cost
        for o in offers
    )
