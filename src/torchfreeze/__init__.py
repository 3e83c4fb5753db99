"""torchfreeze: freezing parts of PyTorch models, correct, explicit and fast.

See DESIGN.md for the concepts: selectors, frozen parameters, ``Frozen`` uses,
pinned modes and freeze state. Every verb works on any ``nn.Module``.
"""

from ._cache import CacheStats, FeatureCache, cache_features
from ._explain import Explanation, FrozenPart, explain
from ._fold import FoldedBatchNorm, fold_batchnorm, foldable_pairs, folded_batchnorms, unfold_batchnorm
from ._compose import Backbone, Composite, HFEncoder, ModuleBackbone, store_frozen_backbone
from ._batchnorm import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze_batchnorm
from ._errors import (
    ArgumentError,
    ArgumentTypeError,
    CacheRefusedError,
    CheckpointError,
    FreezeStateError,
    FrozenTensorChanged,
    ModeError,
    SelectorError,
    SelectorTypeError,
    SharedParameterError,
    TorchFreezeError,
    WeightsError,
)
from ._freeze import (
    freeze,
    freeze_to,
    frozen_parameters,
    is_frozen,
    layer_groups,
    prepare_for_distributed,
    trainable_parameters,
    unfreeze,
)
from ._frozen import Frozen
from ._mode import eval_mode, pin_mode, pinned_modes, train_mode, unpin_mode
from ._select import select
from ._optim import add_unfrozen, param_groups
from ._schedule import GradualUnfreezing
from ._guard import Guard, Problem, check, guard
from ._state import freeze_state, load_freeze_state, load_trainable, save_trainable
from ._summary import Summary, summary
from ._registry import FreezePlan, NothingPretrainedWarning, get_model, list_models, register_model
from ._weights import Weights

__version__ = "0.1.0"

__all__ = [
    # training (issue 3)
    "param_groups",
    "add_unfrozen",
    "GradualUnfreezing",
    "guard",
    "Guard",
    "check",
    "Problem",
    "freeze_state",
    "load_freeze_state",
    "save_trainable",
    "load_trainable",
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
    # mode
    "pin_mode",
    "unpin_mode",
    "pinned_modes",
    "eval_mode",
    "train_mode",
    "freeze_batchnorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    # inspection
    "summary",
    "Summary",
    # speed
    "cache_features",
    "FeatureCache",
    "CacheStats",
    "explain",
    "Explanation",
    "FrozenPart",
    "fold_batchnorm",
    "unfold_batchnorm",
    "folded_batchnorms",
    "foldable_pairs",
    "FoldedBatchNorm",
    # composition and builders
    "Composite",
    "store_frozen_backbone",
    "Backbone",
    "ModuleBackbone",
    "HFEncoder",
    "Weights",
    "register_model",
    "get_model",
    "list_models",
    "FreezePlan",
    "NothingPretrainedWarning",
    # errors
    "TorchFreezeError",
    "SelectorError",
    "SelectorTypeError",
    "SharedParameterError",
    "ModeError",
    "ArgumentError",
    "ArgumentTypeError",
    "FreezeStateError",
    "CheckpointError",
    "WeightsError",
    "FrozenTensorChanged",
    "CacheRefusedError",
]
