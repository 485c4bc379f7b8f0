"""Process settings that are not part of an experiment's result: poll intervals and the
cache folder. Defaults live here only (`RuntimeConfig`, the `[runtime]` table of a config);
an environment variable overrides the config's value (`ENVIRONMENT`), and
`runtime_settings` is the one place either is read.

Precedence, lowest first: the default below, `[runtime]` in the config (when the caller has
one), the environment variable. Each value is resolved when first read, so a malformed
`FEDTUNE_SUPERNODE_POLL_S` fails only the code that polls the SuperLink. Every process that
has the experiment config passes it (`runtime_settings(cfg)`): the ServerApp's grid
(strategies.grid_io), the task's token and dataset caches, the frozen-prefix cache. A
SuperNode has none (it serves any run): it reads the defaults and the environment, which
`fedtune deploy local` sets from its config (fedtune.deploy.cli).

`grid_poll_s = "auto"` (the default) is the one setting whose default depends on where it
runs: a pull from the simulation's in-memory grid costs microseconds, one from a
deployment's SuperLink is a request, so "auto" is `GRID_POLL_AUTO_S[simulation]`.
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
# `grid_poll_s = "auto"` by where the ServerApp runs (simulation: True): in simulation a short
# pause only cuts the wait after the last reply (half a pause on average per round trip).
GRID_POLL_AUTO_S = {True: 0.02, False: 0.1}
AUTO = "auto"
# Upper bounds of the poll intervals, in seconds: Flower's own fixed waits are 3 s, and a
# pause longer than these only slows a round.
MAXIMUM_S = {"grid_poll_s": 60.0, "supernode_poll_s": 3.0}


@dataclass
class RuntimeConfig:
    """`[runtime]`: how this process waits and where it caches, never what it computes."""

    # Pause between the ServerApp's pulls for replies (Flower's HttpGrid waits 3 s), in
    # seconds, or "auto": 0.02 s in simulation, 0.1 s in a deployment (GRID_POLL_AUTO_S).
    grid_poll_s: float | int | str = AUTO
    # Cap on a SuperNode's pauses between polls of the SuperLink (Flower: 3 s and 0.5 s).
    supernode_poll_s: float = 0.1
    # Token and dataset cache; empty = ~/.cache/fedtune.
    cache_dir: str = ""
    # Bound on the frozen-prefix cache (cache_dir/prefix), in GB (10^9 bytes); the least
    # recently used entries are evicted beyond it.
    prefix_cache_gb: float = 4.0

    def validate(self) -> None:
        if isinstance(self.grid_poll_s, str):
            if self.grid_poll_s != AUTO:
                raise ConfigError(f"runtime.grid_poll_s={self.grid_poll_s!r} must be a number "
                                  f"of seconds in (0, {MAXIMUM_S['grid_poll_s']:g}] or "
                                  f"{AUTO!r}")
        else:
            self.grid_poll_s = float(self.grid_poll_s)
        for name, maximum in MAXIMUM_S.items():
            value = getattr(self, name)
            if value == AUTO:
                continue
            if not 0 < value <= maximum:
                raise ConfigError(f"runtime.{name} must be in (0, {maximum:g}] seconds, "
                                  f"got {value!r}")
        if not self.prefix_cache_gb > 0:
            raise ConfigError(f"runtime.prefix_cache_gb must be > 0, got "
                              f"{self.prefix_cache_gb!r}")


class RuntimeSettings:
    """The resolved settings; each attribute is read (config, then environment) on first
    access. A malformed environment variable is a ValueError naming it and its value.
    `simulation`: whether this process runs a simulation (what "auto" resolves by)."""

    def __init__(self, cfg: RuntimeConfig, simulation: bool = False) -> None:
        self._cfg = cfg
        self._simulation = simulation

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
            value = getattr(self._cfg, name)
            return GRID_POLL_AUTO_S[self._simulation] if value == AUTO else float(value)
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value <= maximum:
            raise ValueError(f"{env}={raw!r}: expected seconds in (0, {maximum:g}]")
        return value


def runtime_settings(cfg: Any = None, simulation: bool = False) -> RuntimeSettings:
    """The settings of this process: from `cfg` (an ExperimentConfig or its RuntimeConfig;
    None: the defaults) overridden by the environment; `simulation`: whether the process
    runs a simulation (False: a deployment's values for "auto")."""
    section = getattr(cfg, "runtime", cfg)
    return RuntimeSettings(section if section is not None else RuntimeConfig(), simulation)
