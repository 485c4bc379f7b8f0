"""Frozen pretrained backbones, loaded once per process."""

from fedtune.models.backbone import Backbone, BackboneError, load_backbone

__all__ = ["Backbone", "BackboneError", "load_backbone"]
