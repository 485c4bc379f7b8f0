"""Frozen pretrained backbones, loaded once per process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.models.backbone import (
        Backbone,
        BackboneError,
        backbone_for,
        backbone_from_model,
        load_backbone,
    )

__all__ = ["Backbone", "BackboneError", "backbone_for", "backbone_from_model", "load_backbone"]


def __getattr__(name: str) -> Any:
    # The backbone code imports torch and transformers when first asked for: `fedtune run`
    # resolves `model.prune_layers` (fedtune.models.layer_pruning, torch-free unless a rule
    # needs the model) before Ray starts, and importing it runs this package first.
    if name in __all__:
        from fedtune.models import backbone

        return getattr(backbone, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
