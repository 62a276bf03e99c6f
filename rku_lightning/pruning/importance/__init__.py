"""Scoring methods behind one interface (`Importance.layer_scores`), registered by name with `register_importance`."""

from .activation import FLAP, WandaSP
from .base import IMPORTANCES, Importance, check_importance, get_importance, register_importance
from .gradient import KineticUtility, RelativeKineticUtility, Taylor
from .weight import Magnitude, RandomImportance

__all__ = [
    "IMPORTANCES",
    "Importance",
    "get_importance",
    "check_importance",
    "register_importance",
    "RelativeKineticUtility",
    "KineticUtility",
    "Taylor",
    "Magnitude",
    "WandaSP",
    "FLAP",
    "RandomImportance",
]
