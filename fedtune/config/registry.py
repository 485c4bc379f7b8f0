"""The names a config may use, looked up without importing what implements them.

`fedtune.config` validates tuning methods, corpora, partitioners, layer pruning rules and
plugins through this module, and this module imports nothing of fedtune at load time (but the
error classes), so the config never imports the code it names (no import cycle, no upward
import into the app layer):

- tuning methods register a `MethodSpec` (their `[tuning.<method>]` config dataclass,
  whether split mode can run them, which plugins they compose with): the built-in ones from
  `fedtune.config.methods`, which imports no torch, so validating a config never loads the
  code that builds the model (`fedtune.config` imports it as it loads, so its specs are
  registered before any lookup); the library modules that hold the corpora and
  partitioners are imported on first lookup (`_LIBRARY`);
- the app layer (`strategies.plugins`) registers its own config checks with
  `register_config_check` when it is imported; a config loaded before that gets those
  checks when the app that uses it is assembled (the CLI, the ServerApp).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedtune.config.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """What the config needs to know about a tuning method."""

    name: str
    # The dataclass read from `[tuning.<name>]`; it has `validate(prefix: str)`.
    config: type
    # True when every trainable tensor sits before the cut or in the tail (split mode).
    split: bool
    # Plugin names the method composes with.
    plugins: tuple[str, ...]
    # DP-SGD per-sample gradient modes (`privacy.sample.grad_sample_mode`) the method's
    # tensors cannot be trained under, each with why: (mode, reason).
    refused_grad_modes: tuple[tuple[str, str], ...] = ()


# Every strategy plugin today works on any model with a `head` (each method has one):
# el2n_pruning scores with the model's forward, population_expansion's importance
# weighting reads `head.last_domain_logit`.
ALL_PLUGINS = ("el2n_pruning", "population_expansion")

_METHODS: dict[str, MethodSpec] = {}
_CHECKS: list[Callable[[Any], None]] = []
# Library modules whose import registers each kind of name; (module, listing function).
_LIBRARY: dict[str, tuple[str, str]] = {
    "tuning method": ("fedtune.tuning", "available_methods"),
    "corpus": ("fedtune.data", "available_corpora"),
    "partitioner": ("fedtune.data", "available_partitioners"),
    "layer pruning rule": ("fedtune.models.layer_pruning", "available_rules"),
}


def register_method_spec(spec: MethodSpec) -> None:
    if spec.name in _METHODS:
        raise ValueError(f"tuning method {spec.name!r} is registered twice")
    _METHODS[spec.name] = spec


def available(kind: str) -> list[str]:
    """The registered names of `kind` ("tuning method", "corpus", "partitioner")."""
    module, listing = _LIBRARY[kind]
    return list(getattr(importlib.import_module(module), listing)())


def method_names() -> list[str]:
    """Registered tuning methods (the built-in ones' specs registered as `fedtune.config`
    loads, without torch: their builders are `fedtune.tuning`'s)."""
    return sorted(_METHODS)


def method_spec(name: str, key: str = "tuning.method") -> MethodSpec:
    """The spec of tuning method `name`; a ConfigError naming `key` if there is none."""
    names = method_names()
    if name not in _METHODS:
        raise ConfigError(f"{key}={name!r} is not one of: {', '.join(names)}")
    return _METHODS[name]


def register_config_check(check: Callable[[Any], None]) -> None:
    """Run `check(cfg)` in every later `ExperimentConfig.validate()` (the app layer's
    plugin validation registers itself here). Registering the same check twice is a no-op."""
    if check not in _CHECKS:
        _CHECKS.append(check)


def config_checks() -> list[Callable[[Any], None]]:
    return list(_CHECKS)
