"""rku-lightning: structural pruning of causal LMs by Relative Kinetic Utility."""

from rku_lightning.pruning.compaction import compact
from rku_lightning.pruning.export import load_pruned, save_pruned
from rku_lightning.pruning.gguf import save_gguf
from rku_lightning.pruning.pruner import PruneReport, StructuredPruner

from .loading import load_causal_lm

__all__ = ["StructuredPruner", "PruneReport", "compact", "save_pruned", "load_pruned", "save_gguf", "load_causal_lm"]
__version__ = "0.1.0"
