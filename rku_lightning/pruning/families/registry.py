"""The explicit registry of model families, keyed by `config.model_type`.

A family is registered by decorating its class with `register_family`; claiming a model type that
another family already serves is an error, so that no import order can silently swap the code that
slices a model.
"""

from __future__ import annotations

import inspect
from typing import TypeVar

from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .base import ModelFamily, unwrap_model

FAMILIES: dict[str, type[ModelFamily]] = {}
F = TypeVar("F", bound=type[ModelFamily])


def register_family(cls: F) -> F:
    """Class decorator: `get_family` serves `cls.model_types` with `cls`."""
    if not (isinstance(cls, type) and issubclass(cls, ModelFamily)) or inspect.isabstract(cls):
        raise TypeError(f"register_family: {cls!r} must be a concrete ModelFamily subclass (implement layer_view)")
    if not cls.model_types:
        raise ValueError(f"register_family: {cls.__name__}.model_types is empty; list the config.model_type values it serves")
    for model_type in cls.model_types:
        if model_type in FAMILIES:
            raise ValueError(
                f"register_family: model_type {model_type!r} of {cls.__name__} is already served by "
                f"{FAMILIES[model_type].__name__}; remove it from one of the two model_types"
            )
    FAMILIES.update(dict.fromkeys(cls.model_types, cls))
    return cls


def supported_families() -> str:
    """The registered model types with their causal-LM class names, for error messages."""
    return ", ".join(f"{t} ({MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(t, 'custom')})" for t in sorted(FAMILIES))


def get_family(model: nn.Module) -> ModelFamily:
    """The registered family of `model` (peft-wrapped or not), chosen by its `config.model_type`."""
    model = unwrap_model(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"{type(model).__name__} (model_type {model_type!r}) is not supported for structural pruning; "
            f"supported model types: {supported_families()}"
        )
    if model.get_output_embeddings() is None:
        raise NotImplementedError(
            f"{type(model).__name__} has no LM head; structural pruning needs the causal LM "
            f"({MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, 'the ...ForCausalLM class')})"
        )
    return FAMILIES[model_type](model)
