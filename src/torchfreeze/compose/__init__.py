"""Composition: ``Composite``, the backbone protocol and its adapters (transformers imported lazily)."""

from torchfreeze.compose.composite import Backbone, Composite, HFEncoder, ModuleBackbone, store_frozen_backbone

__all__ = ["Composite", "Backbone", "ModuleBackbone", "HFEncoder", "store_frozen_backbone"]
