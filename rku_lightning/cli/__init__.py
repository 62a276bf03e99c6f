"""Command lines: `python -m rku_lightning.cli.prune` (one-shot pruning) and `python -m rku_lightning.cli.evaluate`."""
