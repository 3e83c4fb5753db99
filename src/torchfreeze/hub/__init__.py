"""Model hub: registry, ``Weights``, freeze plans; the built-in models are imported on demand."""

from torchfreeze.hub.registry import (
    FreezePlan,
    ModelSpec,
    NothingPretrainedWarning,
    get_model,
    list_models,
    model_spec,
    register_model,
)
from torchfreeze.hub.weights import Weights

__all__ = [
    "get_model",
    "list_models",
    "register_model",
    "model_spec",
    "ModelSpec",
    "FreezePlan",
    "NothingPretrainedWarning",
    "Weights",
]
