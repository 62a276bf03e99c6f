"""`PruningSettings`: how the pruner scores and allocates, validated once for every entry point.

`StructuredPruner`, the `RKUPruning` callback and the prune CLI all build one, so a value is accepted
or refused by the same rule with the same message wherever it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from rku_lightning.checks import fraction, one_of, positive_int

from .importance import Importance, check_importance, get_importance
from .objectives import OBJECTIVES, ObjectiveName

Allocation = Literal["global", "uniform", "joint"]
Attention = Literal["groups", "query_heads", "none"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
ATTENTION_MODES: tuple[str, ...] = get_args(Attention)


@dataclass(frozen=True)
class PruningSettings:
    """What to score with and how to spend the budget (see `StructuredPruner` for each field).

    `importance` is a registered name or an `Importance` instance (a user's own scorer; in a config,
    `class_path` and `init_args`). A named method is built with `seed`; an instance keeps its own.
    """

    importance: str | Importance = "rku"
    allocation: Allocation = "uniform"
    objective: ObjectiveName = "ce"
    attention: Attention = "groups"
    min_mlp_keep: float = 0.1
    micro_batch_size: int | None = None
    seed: int = 0
    checkpoint_layers: bool = False

    def __post_init__(self) -> None:
        check_importance(self.importance)
        one_of("allocation", self.allocation, ALLOCATIONS)
        one_of("objective", self.objective, OBJECTIVES)
        one_of("attention", self.attention, ATTENTION_MODES)
        object.__setattr__(self, "min_mlp_keep", fraction("min_mlp_keep", self.min_mlp_keep))
        positive_int("micro_batch_size", self.micro_batch_size, optional=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.checkpoint_layers, bool):
            raise ValueError(f"checkpoint_layers must be True or False, got {self.checkpoint_layers!r}")

    @property
    def importance_name(self) -> str:
        """The method's name, for reports (an instance's class-level `name`)."""
        return self.importance if isinstance(self.importance, str) else self.importance.name

    def build_importance(self) -> Importance:
        return get_importance(self.importance, seed=self.seed)

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (a shallow copy: an `Importance` instance is passed on, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
