"""Activation checkpointing of decoder layers during calibration: gate gradients at a fraction of the memory.

A scoring pass keeps every layer's activations for the backward pass; on long traces that, not the
weights, is what runs out of memory. Wrapped layers keep only their inputs and recompute the rest
during backward (`torch.utils.checkpoint`, non-reentrant), so the gate gradients are exactly those of
the unchecked pass. The recomputation runs the gates' hooks a second time: `quiet` silences what must
not happen twice there (activation statistics).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import ContextManager

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward: Callable, quiet: Callable[[], ContextManager], *args, **kwargs):
    calls = 0

    def run(*inner_args, **inner_kwargs):
        nonlocal calls
        calls += 1
        with quiet() if calls > 1 else contextlib.nullcontext():
            return forward(*inner_args, **inner_kwargs)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def checkpointed_layers(layers: Sequence[nn.Module], quiet: Callable[[], ContextManager]) -> Iterator[None]:
    """Within the block, every layer in `layers` recomputes its activations in backward."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward, quiet)
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
