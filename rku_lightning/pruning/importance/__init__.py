"""Scoring methods behind one interface (`Importance.layer_scores`), looked up by name."""

from .activation import FLAP, WandaSP
from .base import IMPORTANCES, Importance, get_importance
from .gradient import KineticUtility, RelativeKineticUtility, Taylor
from .weight import Magnitude, RandomImportance

__all__ = [
    "IMPORTANCES",
    "Importance",
    "get_importance",
    "RelativeKineticUtility",
    "KineticUtility",
    "Taylor",
    "Magnitude",
    "WandaSP",
    "FLAP",
    "RandomImportance",
]
