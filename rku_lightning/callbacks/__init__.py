"""Lightning callbacks of rku-lightning: `RKUPruning` (iterative prune-and-recover), its progress bar, and
`restore_pruned_shapes` for a module's `on_load_checkpoint` (the final checkpoint holds pruned shapes)."""

from .rku_pruning import RKUProgressBar, RKUPruning, restore_pruned_shapes

__all__ = ["RKUPruning", "RKUProgressBar", "restore_pruned_shapes"]
