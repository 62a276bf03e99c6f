"""Lightning callbacks of rku-lightning: `RKUPruning` (iterative prune-and-recover) and its progress bar."""

from .rku_pruning import RKUProgressBar, RKUPruning

__all__ = ["RKUPruning", "RKUProgressBar"]
