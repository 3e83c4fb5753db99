"""torchfreeze: freezing parts of PyTorch models, correct, explicit and fast.

The verbs of a normal training script are here, flat. Result classes and
adapters live in their layers (``torchfreeze.nn``, ``torchfreeze.training``,
``torchfreeze.speed``, ``torchfreeze.compose``, ``torchfreeze.hub``), errors in
``torchfreeze.errors``. docs/architecture.md describes the layers.
"""

from torchfreeze import errors
from torchfreeze._core.mode import eval_mode, pin_mode, pinned_modes, train_mode, unpin_mode
from torchfreeze._core.select import Selector, select
from torchfreeze.compose import Composite, store_frozen_backbone
from torchfreeze.hub import Weights, get_model, list_models, register_model
from torchfreeze.nn import (
    Frozen,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    fold_batchnorm,
    foldable_pairs,
    folded_batchnorms,
    freeze,
    freeze_batchnorm,
    freeze_to,
    frozen_parameters,
    is_frozen,
    layer_groups,
    prepare_for_distributed,
    summary,
    trainable_parameters,
    unfold_batchnorm,
    unfreeze,
)
from torchfreeze.speed import cache_features, cache_frozen_prefix, explain, precompute_features
from torchfreeze.training import (
    GradualUnfreezing,
    ProgressiveFreezing,
    add_unfrozen,
    check,
    freeze_state,
    guard,
    load_freeze_state,
    load_trainable,
    param_groups,
    save_trainable,
)

__version__ = "0.2.0"

__all__ = [
    "errors",
    "Selector",
    # selection and freezing
    "select",
    "freeze",
    "unfreeze",
    "freeze_to",
    "layer_groups",
    "is_frozen",
    "trainable_parameters",
    "frozen_parameters",
    "Frozen",
    "prepare_for_distributed",
    # mode and BatchNorm
    "pin_mode",
    "unpin_mode",
    "pinned_modes",
    "eval_mode",
    "train_mode",
    "freeze_batchnorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "fold_batchnorm",
    "unfold_batchnorm",
    "folded_batchnorms",
    "foldable_pairs",
    # training
    "param_groups",
    "add_unfrozen",
    "GradualUnfreezing",
    "ProgressiveFreezing",
    "guard",
    "check",
    "freeze_state",
    "load_freeze_state",
    "save_trainable",
    "load_trainable",
    # inspection and speed
    "summary",
    "explain",
    "cache_features",
    "precompute_features",
    "cache_frozen_prefix",
    # composition and builders
    "Composite",
    "store_frozen_backbone",
    "get_model",
    "list_models",
    "register_model",
    "Weights",
]
