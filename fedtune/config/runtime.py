"""Process settings that are not part of an experiment's result: poll intervals and the
cache folder. Defaults live here only (`RuntimeConfig`, the `[runtime]` table of a config);
an environment variable overrides the config's value (`ENVIRONMENT`), and
`runtime_settings` is the one place either is read.

Precedence, lowest first: the default below, `[runtime]` in the config (when the caller has
one), the environment variable. Each value is resolved when first read, so a malformed
`FEDTUNE_SUPERNODE_POLL_S` fails only the code that polls the SuperLink.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from fedtune.config.errors import ConfigError

# Setting -> the environment variable that overrides it.
ENVIRONMENT = {
    "grid_poll_s": "FEDTUNE_GRID_POLL_S",
    "supernode_poll_s": "FEDTUNE_SUPERNODE_POLL_S",
    "cache_dir": "FEDTUNE_CACHE_DIR",
    "prefix_cache_gb": "FEDTUNE_PREFIX_CACHE_GB",
}
# Upper bounds of the poll intervals, in seconds: Flower's own fixed waits are 3 s, and a
# pause longer than these only slows a round.
MAXIMUM_S = {"grid_poll_s": 60.0, "supernode_poll_s": 3.0}


@dataclass
class RuntimeConfig:
    """`[runtime]`: how this process waits and where it caches, never what it computes."""

    # Pause between the ServerApp's pulls for replies (Flower's HttpGrid waits 3 s).
    grid_poll_s: float = 0.1
    # Cap on a SuperNode's pauses between polls of the SuperLink (Flower: 3 s and 0.5 s).
    supernode_poll_s: float = 0.1
    # Token and dataset cache; empty = ~/.cache/fedtune.
    cache_dir: str = ""
    # Bound on the frozen-prefix cache (cache_dir/prefix), in GB (10^9 bytes); the least
    # recently used entries are evicted beyond it.
    prefix_cache_gb: float = 4.0

    def validate(self) -> None:
        for name, maximum in MAXIMUM_S.items():
            value = getattr(self, name)
            if not 0 < value <= maximum:
                raise ConfigError(f"runtime.{name} must be in (0, {maximum:g}] seconds, "
                                  f"got {value!r}")
        if not self.prefix_cache_gb > 0:
            raise ConfigError(f"runtime.prefix_cache_gb must be > 0, got "
                              f"{self.prefix_cache_gb!r}")


class RuntimeSettings:
    """The resolved settings; each attribute is read (config, then environment) on first
    access. A malformed environment variable is a ValueError naming it and its value."""

    def __init__(self, cfg: RuntimeConfig) -> None:
        self._cfg = cfg

    @cached_property
    def grid_poll_s(self) -> float:
        return self._seconds("grid_poll_s")

    @cached_property
    def supernode_poll_s(self) -> float:
        return self._seconds("supernode_poll_s")

    @cached_property
    def cache_dir(self) -> Path:
        raw = os.environ.get(ENVIRONMENT["cache_dir"]) or self._cfg.cache_dir
        return Path(raw).expanduser() if raw else Path.home() / ".cache" / "fedtune"

    @cached_property
    def prefix_cache_bytes(self) -> int:
        env = ENVIRONMENT["prefix_cache_gb"]
        raw = os.environ.get(env)
        if raw is None:
            return int(self._cfg.prefix_cache_gb * 1e9)
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{env}={raw!r}: expected a size in GB > 0")
        return int(value * 1e9)

    def _seconds(self, name: str) -> float:
        env, maximum = ENVIRONMENT[name], MAXIMUM_S[name]
        raw = os.environ.get(env)
        if raw is None:
            return float(getattr(self._cfg, name))
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value <= maximum:
            raise ValueError(f"{env}={raw!r}: expected seconds in (0, {maximum:g}]")
        return value


def runtime_settings(cfg: Any = None) -> RuntimeSettings:
    """The settings of this process: from `cfg` (an ExperimentConfig or its RuntimeConfig;
    None: the defaults) overridden by the environment."""
    section = getattr(cfg, "runtime", cfg)
    return RuntimeSettings(section if section is not None else RuntimeConfig())
