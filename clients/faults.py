"""Injected client faults (config `[faults]`), seeded per client and round so a faulty run
re-runs identically. Used to show the server survives crashes and garbage replies."""

from __future__ import annotations

import random

import numpy as np

from fedtune.config import FaultConfig

GARBAGE_KINDS = ("nan", "length", "spec")


class InjectedCrash(RuntimeError):
    """A client failure injected by `faults.crash_p`."""


def draw_fault(cfg: FaultConfig, seed: int) -> str | None:
    """None, "crash", or one of GARBAGE_KINDS."""
    if cfg.crash_p == 0 and cfg.garbage_p == 0:
        return None
    rng = random.Random(seed ^ 0x5EED)
    r = rng.random()
    if r < cfg.crash_p:
        return "crash"
    if r < cfg.crash_p + cfg.garbage_p:
        return rng.choice(GARBAGE_KINDS)
    return None


def corrupt(delta: np.ndarray, spec_hash: str, kind: str) -> tuple[np.ndarray, str]:
    """The delta and spec hash a faulty client would send."""
    if kind == "nan":
        bad = delta.copy()
        bad[:: max(1, bad.size // 7)] = np.nan
        return bad, spec_hash
    if kind == "length":
        return delta[:-1].copy(), spec_hash
    if kind == "spec":
        return delta, "0" * len(spec_hash)
    raise ValueError(f"unknown fault kind {kind!r}")
