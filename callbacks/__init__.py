"""The project's Lightning callbacks, for scripts run from the repository root.

The installed package is `rku_lightning.callbacks`; this folder re-exports it so that
`from callbacks import RKUPruning` and `from rku_lightning.callbacks import RKUPruning` are one class.
"""

from rku_lightning.callbacks import RKUProgressBar, RKUPruning

__all__ = ["RKUPruning", "RKUProgressBar"]
