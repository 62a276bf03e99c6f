"""rku-lightning: structural pruning of causal LMs by Relative Kinetic Utility."""

from .compaction import compact
from .export import load_pruned, save_pruned
from .loading import load_causal_lm
from .pruner import PruneReport, StructuredPruner

__all__ = ["StructuredPruner", "PruneReport", "compact", "save_pruned", "load_pruned", "load_causal_lm"]
__version__ = "0.1.0"
