"""Speed: the feature cache and ``explain`` (what freezing saves here, and why not more)."""

from torchfreeze.speed.cache import CacheStats, FeatureCache, cache_features, cache_refusal_reasons
from torchfreeze.speed.explain import Explanation, FrozenPart, explain

__all__ = [
    "cache_features",
    "FeatureCache",
    "CacheStats",
    "cache_refusal_reasons",
    "explain",
    "Explanation",
    "FrozenPart",
]
