"""Tuning methods register by name, with their config dataclass; config and CLI look them
up here (the config through `fedtune.config.registry`, which holds each method's spec).

A method's spec and its builder may come from two modules: the built-in methods' specs are
registered without torch (`fedtune.config.methods`), so that validating a config does not
import what builds the model, and each builder module attaches its builder by name
(`register_builder`). `register_method` does both in one call, for a method that lives in
one module."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedtune.config.registry import ALL_PLUGINS, MethodSpec, method_names, register_method_spec

if TYPE_CHECKING:
    from fedtune.config import TuningConfig
    from fedtune.models import Backbone
    from fedtune.tuning.base import TunedModel

MethodBuilder = Callable[["Backbone", "TuningConfig", int, int], "TunedModel"]
# The task kind a method's builder serves (`[task] kind`): the same method name builds a
# classifier or a language model.
DEFAULT_KIND = "classification"
_METHODS: dict[str, MethodBuilder] = {}
_KIND_BUILDERS: dict[tuple[str, str], MethodBuilder] = {}


def register_method(name: str, config: type, *, split: bool = False,
                    plugins: tuple[str, ...] = ALL_PLUGINS
                    ) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register a builder under `name` with its `[tuning.<name>]` config dataclass, whether
    split mode can run it, and the plugins it composes with."""
    def deco(builder: MethodBuilder) -> MethodBuilder:
        if name in _METHODS:
            raise ValueError(f"tuning method {name!r} is registered twice")
        register_method_spec(MethodSpec(name, config, split, tuple(plugins)))
        _METHODS[name] = builder
        return builder

    return deco


def register_builder(name: str, kind: str = DEFAULT_KIND
                     ) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register the builder of method `name` for task `kind`, whose spec is already
    registered (the built-in methods' in `fedtune.config.methods`)."""
    def deco(builder: MethodBuilder) -> MethodBuilder:
        if kind != DEFAULT_KIND:
            if (kind, name) in _KIND_BUILDERS or name not in method_names():
                raise ValueError(f"tuning method {name!r} for task kind {kind!r} is "
                                 "registered twice or has no registered spec")
            _KIND_BUILDERS[(kind, name)] = builder
            return builder
        if name in _METHODS:
            raise ValueError(f"tuning method {name!r} is registered twice")
        if name not in method_names():
            raise ValueError(f"tuning method {name!r} has no registered spec: register it "
                             "with register_method(name, config, ...)")
        _METHODS[name] = builder
        return builder

    return deco


def available_methods() -> list[str]:
    return sorted(_METHODS)


def build_tuned_model(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int,
                      kind: str = DEFAULT_KIND) -> TunedModel:
    """Attach method `cfg.method`'s trainable tensors (seeded) to the frozen backbone, as
    built for task `kind` (a classifier by default)."""
    if kind != DEFAULT_KIND:
        built = sorted(m for k, m in _KIND_BUILDERS if k == kind)
        if (kind, cfg.method) not in _KIND_BUILDERS:
            raise ValueError(f"tuning.method={cfg.method!r} is not built for task.kind="
                             f"{kind!r}; built: {', '.join(built) or 'none'}")
        return _KIND_BUILDERS[(kind, cfg.method)](backbone, cfg, num_labels, seed)
    if cfg.method not in _METHODS:
        raise ValueError(
            f"tuning.method={cfg.method!r} is not one of: {', '.join(available_methods())}"
        )
    return _METHODS[cfg.method](backbone, cfg, num_labels, seed)
