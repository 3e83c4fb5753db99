"""The built-in models' builders and the digits data helpers, at one import path.

Each built-in model lives in its own module under :mod:`torchfreeze.hub.builtin`
(``digits``: ``"digits-cnn"``; ``minilm``: ``"minilm-classifier"``), which the
registry imports only when that name is asked for. Importing this module
registers nothing and imports neither scikit-learn nor ``transformers``.

>>> from torchfreeze.hub.models import DigitsBackbone
>>> DigitsBackbone.feature_dim
128
"""

from __future__ import annotations

from torchfreeze.hub.builtin.digits import (
    DigitsBackbone,
    digits_cnn,
    digits_weights,
    load_digits_tensors,
    stratified_split,
)
from torchfreeze.hub.builtin.minilm import MINILM_WEIGHTS, minilm_classifier

__all__ = [
    "DigitsBackbone",
    "digits_cnn",
    "digits_weights",
    "minilm_classifier",
    "MINILM_WEIGHTS",
    "load_digits_tensors",
    "stratified_split",
]
