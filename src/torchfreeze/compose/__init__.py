"""Composition: ``Composite``, the backbone protocol and its adapters (transformers never imported here)."""

from torchfreeze.compose.adapters import HFEncoder, ModuleBackbone
from torchfreeze.compose.composite import Backbone, Composite, store_frozen_backbone

__all__ = ["Composite", "Backbone", "ModuleBackbone", "HFEncoder", "store_frozen_backbone"]
