"""Tuning methods register by name; config and CLI look them up here."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedtune.config import TuningConfig
    from fedtune.models import Backbone
    from fedtune.tuning.base import TunedModel

MethodBuilder = Callable[["Backbone", "TuningConfig", int, int], "TunedModel"]
_METHODS: dict[str, MethodBuilder] = {}


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    def deco(builder: MethodBuilder) -> MethodBuilder:
        if name in _METHODS:
            raise ValueError(f"tuning method {name!r} is registered twice")
        _METHODS[name] = builder
        return builder

    return deco


def available_methods() -> list[str]:
    return sorted(_METHODS)


def build_tuned_model(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                      ) -> TunedModel:
    """Attach method `cfg.method`'s trainable tensors (seeded) to the frozen backbone."""
    if cfg.method not in _METHODS:
        raise ValueError(
            f"tuning.method={cfg.method!r} is not one of: {', '.join(available_methods())}"
        )
    return _METHODS[cfg.method](backbone, cfg, num_labels, seed)
