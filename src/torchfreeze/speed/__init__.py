"""Speed: the feature cache and ``explain`` (what freezing saves here, and why not more).

Modules: :mod:`~torchfreeze.speed.cache` (``cache_features``, ``FeatureCache``),
:mod:`~torchfreeze.speed.keys` (fingerprints and content keys),
:mod:`~torchfreeze.speed.storage` (the in-memory LRU and disk entries, ``CacheStats``),
:mod:`~torchfreeze.speed.precompute` (``precompute_features``: a frozen backbone once over a data set;
its result class in :mod:`~torchfreeze.speed.precomputed`), :mod:`~torchfreeze.speed.slabs` (rows in
preallocated tensors), :mod:`~torchfreeze.speed.prefix` (``cache_frozen_prefix``: skip a model's frozen leading groups),
:mod:`~torchfreeze.speed.refusal` (what the cache refuses, and why),
:mod:`~torchfreeze.speed.explain` (``explain``) and :mod:`~torchfreeze.speed.report`
(``Explanation``, ``FrozenPart``).
"""

from torchfreeze.speed.cache import FeatureCache, cache_features
from torchfreeze.speed.explain import explain
from torchfreeze.speed.keys import module_fingerprint
from torchfreeze.speed.precompute import PrecomputedFeatures, precompute_features
from torchfreeze.speed.prefix import PrefixCache, PrefixStats, cache_frozen_prefix
from torchfreeze.speed.refusal import cache_refusal_reasons
from torchfreeze.speed.report import Explanation, FrozenPart
from torchfreeze.speed.storage import CacheStats

__all__ = [
    "cache_features",
    "FeatureCache",
    "CacheStats",
    "precompute_features",
    "PrecomputedFeatures",
    "cache_frozen_prefix",
    "PrefixCache",
    "PrefixStats",
    "cache_refusal_reasons",
    "module_fingerprint",
    "explain",
    "Explanation",
    "FrozenPart",
]
