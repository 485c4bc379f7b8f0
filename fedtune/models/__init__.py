"""Frozen pretrained backbones, loaded once per process."""

from fedtune.models.backbone import (
    Backbone,
    BackboneError,
    backbone_for,
    backbone_from_model,
    load_backbone,
)

__all__ = ["Backbone", "BackboneError", "backbone_for", "backbone_from_model", "load_backbone"]
