"""Injected client faults (config `[faults]`), seeded per client and round so a faulty run
re-runs identically. Used to show the server survives crashes, hangs and garbage replies."""

from __future__ import annotations

import random
import time

import numpy as np

from fedtune.config import AttackSimulationConfig, FaultConfig

GARBAGE_KINDS = ("nan", "length", "spec")


class InjectedCrash(RuntimeError):
    """A client failure injected by `faults.crash_p` or `faults.hang_p`."""


def draw_fault(cfg: FaultConfig, seed: int) -> str | None:
    """None, "crash", "hang", or one of GARBAGE_KINDS."""
    if cfg.crash_p == 0 and cfg.garbage_p == 0 and cfg.hang_p == 0:
        return None
    rng = random.Random(seed ^ 0x5EED)
    r = rng.random()
    if r < cfg.crash_p:
        return "crash"
    if r < cfg.crash_p + cfg.hang_p:
        return "hang"
    if r < cfg.crash_p + cfg.hang_p + cfg.garbage_p:
        return rng.choice(GARBAGE_KINDS)
    return None


def fail_before_training(kind: str, cfg: FaultConfig, server_round: int) -> None:
    """Crash now, or hang past the round's timeout and then crash. Both happen before any
    training, so the client spends no privacy budget the server cannot see."""
    if kind == "hang":
        time.sleep(cfg.hang_s)
        raise InjectedCrash(f"injected hang of {cfg.hang_s:g} s (faults.hang_p) in round "
                            f"{server_round}, past the round timeout")
    raise InjectedCrash(f"injected crash (faults.crash_p) in round {server_round}")


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


# Attack simulation (`[faults.attack_simulation]`, benchmarks and tests only): a poisoning
# client scales its honest delta. flip: -scale x (drags the model back), boost: scale x
# (model replacement). It ignores a client-side clip, as a real attacker would.
ATTACKS = {"flip": lambda delta, k: -k * delta, "boost": lambda delta, k: k * delta}


def withhold(cfg: AttackSimulationConfig, partition_id: int, server_round: int) -> None:
    """kind "withhold": the listed partitions' clients fail before training every round, so
    the run is the honest one without them (what a defence that excludes them every round
    can reach at best; no privacy spent)."""
    if cfg.kind == "withhold" and partition_id in cfg.partitions:
        raise InjectedCrash(f"partition {partition_id} withholds its delta in round "
                            f"{server_round} (faults.attack_simulation.kind = withhold)")


def attack(cfg: AttackSimulationConfig, partition_id: int, delta: np.ndarray) -> np.ndarray:
    """What the client of `partition_id` sends instead of its honest `delta`: the delta
    itself unless that partition is a configured attacker that scales it."""
    if cfg.kind not in ATTACKS or partition_id not in cfg.partitions:
        return delta
    with np.errstate(over="ignore"):  # overflow to inf is what the server then rejects
        return ATTACKS[cfg.kind](delta, np.float32(cfg.scale)).astype(np.float32)
