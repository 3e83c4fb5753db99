"""Modules and module surgery: freezing verbs, ``Frozen``, ``FrozenBatchNorm*``, BatchNorm freeze/convert/fold, ``summary``."""

from torchfreeze.nn.batchnorm import (
    FROZEN_BATCHNORM_TYPES,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batchnorm,
    is_norm,
)
from torchfreeze.nn.fold import FoldedBatchNorm, fold_batchnorm, foldable_pairs, folded_batchnorms, unfold_batchnorm
from torchfreeze.nn.freezing import (
    freeze,
    freeze_to,
    frozen_parameters,
    is_frozen,
    prepare_for_distributed,
    trainable_parameters,
    unfreeze,
)
from torchfreeze.nn.frozen import Frozen
from torchfreeze.nn.groups import layer_groups
from torchfreeze.nn.summary import Summary, SummaryRow, summary

__all__ = [
    "freeze",
    "unfreeze",
    "freeze_to",
    "layer_groups",
    "is_frozen",
    "trainable_parameters",
    "frozen_parameters",
    "prepare_for_distributed",
    "Frozen",
    "freeze_batchnorm",
    "is_norm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FROZEN_BATCHNORM_TYPES",
    "fold_batchnorm",
    "unfold_batchnorm",
    "folded_batchnorms",
    "foldable_pairs",
    "FoldedBatchNorm",
    "summary",
    "Summary",
    "SummaryRow",
]
