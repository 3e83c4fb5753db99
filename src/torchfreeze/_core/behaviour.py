"""Is a module random, or does it change its statistics, in its current mode? The one predicate.

``check``, ``explain``, ``cache_features`` and ``guard`` all ask
:func:`nondeterminism`, so they agree on what counts:

* **random**: every dropout module (``nn.Dropout*``, ``AlphaDropout``,
  ``FeatureAlphaDropout``), the dropout inside ``nn.MultiheadAttention`` and
  the RNNs (``dropout > 0``), ``nn.RReLU``, any module with a float
  functional-dropout attribute (``dropout``, ``dropout_p``, ``dropout_prob``,
  ``attention_dropout``, ``attn_dropout``: Hugging Face attention layers), a
  stochastic-depth rate (``drop_prob`` of timm's and Hugging Face's
  ``DropPath``, ``drop_path_rate``, ``drop_path_prob``, ``stochastic_depth_prob``,
  ``drop_connect_rate``), and **LayerDrop** (Fan et al., 2019: a parent that
  skips its layers at random, ``layerdrop`` / ``layer_drop`` /
  ``encoder_layerdrop`` / ``decoder_layerdrop`` attributes or Hugging Face's
  ``config.layerdrop`` on a module that holds a ``ModuleList``; see
  :func:`layer_skipping`) — all only in train mode. The randomness of LayerDrop
  is the *parent's*: it follows the parent's flag, not the skipped layers';
* **updates statistics**: BatchNorm, SyncBatchNorm and InstanceNorm layers with
  ``track_running_stats=True`` in train mode (BatchNorm then also normalises
  with the batch's statistics);
* **batch-dependent**: a BatchNorm with ``track_running_stats=False`` uses the
  batch's statistics in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

from torchfreeze._core.uses import FrozenUse

__all__ = [
    "Nondeterminism",
    "NondeterminismKind",
    "FUNCTIONAL_DROPOUT_ATTRIBUTES",
    "nondeterminism",
    "nondeterministic_modules",
    "LAYER_DROP_ATTRIBUTES",
    "layer_skipping",
    "gradient_switch",
    "is_normalization",
    "tracks_running_stats",
]

NondeterminismKind = Literal["random", "updates-statistics", "batch-dependent"]

FUNCTIONAL_DROPOUT_ATTRIBUTES = (
    "dropout",
    "dropout_p",
    "dropout_prob",
    "attention_dropout",
    "attn_dropout",
    "drop_prob",
    "drop_path_rate",
    "drop_path_prob",
    "stochastic_depth_prob",
    "drop_connect_rate",
)

#: attributes holding a LayerDrop rate on the module that runs (and may skip) a list of layers
LAYER_DROP_ATTRIBUTES = ("layerdrop", "layer_drop", "encoder_layerdrop", "decoder_layerdrop")

_NORMALIZATION_TYPES: tuple[type[nn.Module], ...] = (
    _NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, their lazy forms
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class Nondeterminism:
    """Why one module's output is not a fixed function of its input in its current mode."""

    name: str
    """Qualified name of the module (``""`` for the root)."""
    kind: NondeterminismKind
    detail: str
    """Class name and the setting responsible, e.g. ``"Dropout, p=0.1"``."""

    def sentence(self) -> str:
        """One plain sentence naming the layer and the reason.

        >>> nondeterministic_modules(nn.Sequential(nn.Dropout(0.1)))[0].sentence()
        "layer '0' (Dropout, p=0.1) is in train mode, so it is random"
        """
        where = f"layer '{self.name or '<root>'}' ({self.detail})"
        if self.kind == "random":
            return f"{where} is in train mode, so it is random"
        if self.kind == "updates-statistics":
            return f"{where} is in train mode and updates its running statistics"
        return f"{where} normalises with the batch's statistics: its output depends on the batch"


def is_normalization(module: nn.Module) -> bool:
    """True for the normalisation layers of ``torch.nn`` (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, ...).

    >>> is_normalization(nn.BatchNorm2d(3)), is_normalization(nn.Linear(2, 2))
    (True, False)
    """
    return isinstance(module, _NORMALIZATION_TYPES)


def tracks_running_stats(module: nn.Module) -> bool:
    """True when ``module`` keeps running statistics (a BatchNorm/InstanceNorm with ``track_running_stats``).

    >>> tracks_running_stats(nn.BatchNorm1d(2)), tracks_running_stats(nn.LayerNorm(2))
    (True, False)
    """
    return bool(getattr(module, "track_running_stats", False)) and getattr(module, "running_mean", None) is not None


def _own(module: nn.Module, attribute: str) -> Any:
    """An attribute the module itself holds (never a wrapper's forwarding ``__getattr__``)."""
    return module.__dict__.get(attribute)


def _functional_dropout(module: nn.Module) -> tuple[str, float] | None:
    for attribute in FUNCTIONAL_DROPOUT_ATTRIBUTES:
        value = _own(module, attribute)
        if isinstance(value, float) and value > 0:
            return attribute, value
    return None


def layer_skipping(module: nn.Module) -> tuple[str, float, list[str]] | None:
    """The LayerDrop this module applies to its layers (whatever its mode), or ``None``.

    A module skips its layers at random in train mode (LayerDrop, Fan et al. 2019,
    "Reducing Transformer Depth on Demand with Structured Dropout") when it holds a
    ``ModuleList`` of layers and a positive rate in one of ``LAYER_DROP_ATTRIBUTES``,
    or a ``config`` whose ``layerdrop`` is positive (Hugging Face's Wav2Vec2 / HuBERT
    encoders read ``self.config.layerdrop``). The decision follows *this* module's
    ``training`` flag: pinning the skipped layers to eval does not stop it.

    Args:
        module: any module.

    Returns:
        ``(setting, rate, layer lists)``: e.g. ``("config.layerdrop", 0.5, ["layers"])``,
        the names of its ``ModuleList`` children; ``None`` when it skips nothing.

    Example:
        >>> enc = nn.Module()
        >>> enc.layers, enc.layerdrop = nn.ModuleList([nn.Linear(2, 2)]), 0.1
        >>> layer_skipping(enc)
        ('layerdrop', 0.1, ['layers'])
    """
    lists = [n for n, c in module.named_children() if isinstance(c, nn.ModuleList)]
    if not lists:
        return None
    for attribute in LAYER_DROP_ATTRIBUTES:
        value = _own(module, attribute)
        if isinstance(value, (float, int)) and not isinstance(value, bool) and value > 0:
            return attribute, float(value), lists
    value = getattr(_own(module, "config"), "layerdrop", None)
    if isinstance(value, (float, int)) and not isinstance(value, bool) and value > 0:
        return "config.layerdrop", float(value), lists
    return None


def gradient_switch(module: nn.Module) -> bool | None:
    """The model's own "my input requires grad" switch, or ``None`` when it has none.

    Hugging Face's feature encoders (Wav2Vec2, HuBERT, ...) hold ``_requires_grad``
    and, while it is on and the module trains, set ``requires_grad=True`` on their
    input so that autograd runs through them even when every weight is frozen;
    their ``_freeze_parameters()`` turns it off (``model.freeze_feature_encoder()``).

    Example:
        >>> gradient_switch(nn.Linear(2, 2)) is None
        True
    """
    value = _own(module, "_requires_grad")
    if isinstance(value, bool) and callable(getattr(type(module), "_freeze_parameters", None)):
        return value
    return None


def nondeterminism(module: nn.Module, name: str = "") -> Nondeterminism | None:
    """What makes this one module (not its children) random or statistics-changing now, or ``None``.

    Args:
        module: the module, in its current train/eval mode.
        name: its qualified name, carried into the result.

    Returns:
        A :class:`Nondeterminism`, or ``None`` when the module is a fixed function in its current mode.

    Example:
        >>> mha = nn.MultiheadAttention(4, 2, dropout=0.1)
        >>> nondeterminism(mha).kind, nondeterminism(mha.eval())
        ('random', None)
    """
    kind = type(module).__name__
    if isinstance(module, FrozenUse):  # a wrapper: its wrapped modules answer for themselves
        return None
    if isinstance(module, _NormBase):
        if not module.track_running_stats and not isinstance(module, _InstanceNorm):
            return Nondeterminism(name, "batch-dependent", f"{kind}, track_running_stats=False")
        if module.training and module.track_running_stats:
            return Nondeterminism(name, "updates-statistics", kind)
        return None
    if not module.training:
        return None
    if isinstance(module, _DropoutNd):
        return Nondeterminism(name, "random", f"{kind}, p={module.p}") if module.p > 0 else None
    if isinstance(module, nn.RReLU):
        if module.lower != module.upper:
            return Nondeterminism(name, "random", f"{kind}, lower={module.lower}, upper={module.upper}")
        return None
    functional = _functional_dropout(module)
    if functional is not None:
        return Nondeterminism(name, "random", f"{kind}, {functional[0]}={functional[1]}")
    skipping = layer_skipping(module)
    if skipping is not None:
        return Nondeterminism(name, "random", f"{kind}, {skipping[0]}={skipping[1]}: skips its layers at random")
    return None


def nondeterministic_modules(model: nn.Module, *, prefix: str = "") -> list[Nondeterminism]:
    """Every module of ``model`` that is random or changes statistics in its current mode, in model order.

    Args:
        model: any ``nn.Module``.
        prefix: prepended (with a dot) to each qualified name.

    Returns:
        One :class:`Nondeterminism` per such module.

    Example:
        >>> layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.1)
        >>> [(n.name, n.kind) for n in nondeterministic_modules(layer)][:2]
        [('self_attn', 'random'), ('dropout', 'random')]
    """
    found = []
    for name, module in model.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        entry = nondeterminism(module, full)
        if entry is not None:
            found.append(entry)
    return found
