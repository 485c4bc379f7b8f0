"""Privacy accounting with Opacus' accountants.

A client's spend is fully described by its history of (noise_multiplier, sample_rate,
steps) triples; that history is what the client keeps between rounds and what the ledger
records, so anyone can recompute each reported epsilon.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

from fedtune.config.accountant_steps import (  # noqa: F401 (re-used here)
    MAX_STEPS,
    SIGMA_MAX,
    max_steps,
    sigma_range,
)
from fedtune.privacy.bounded_accountant import (
    PRV_MAX_POINTS,  # noqa: F401 (re-exported)
    affordable,
    bounded_epsilon,
    prv_epsilon,
    search_noise,
    tightest_error,
)

# Opacus is imported where it is used: it costs ~2 s of CPU to import, and every Ray actor
# and driver imports this module, also for runs with sample-level DP off.


@dataclass
class DPHistory:
    """Steps taken so far, as Opacus' accountant history: [(sigma, q, steps), ...]."""

    entries: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.entries)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        if self.entries and self.entries[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.entries[-1]
            self.entries[-1] = (sigma, q, n + steps)
        else:
            self.entries.append((noise_multiplier, sample_rate, steps))

    def to_lists(self) -> dict[str, list]:
        return {
            "sigma": [e[0] for e in self.entries],
            "q": [e[1] for e in self.entries],
            "steps": [e[2] for e in self.entries],
        }

    @classmethod
    def from_lists(cls, data: dict[str, list]) -> DPHistory:
        """The history `to_lists` wrote; entries of no steps are no release and are left out
        (as `add` leaves them out)."""
        history = cls()
        for s, q, n in zip(data["sigma"], data["q"], data["steps"], strict=True):
            history.add(float(s), float(q), int(n))
        return history


# Entries and steps bound the accountant's time and memory (a forged long or huge history
# stalled it for minutes or asked for 145 GiB, issue 27). The server accounts only its own
# plan; these and the noise ranges (`fedtune.config.accountant_steps.SIGMA_FLOOR`) catch a
# config or a plan outside them with a clear error instead of a crash deep inside Opacus.
MAX_ENTRIES = 4096


def check_history(entries: tuple[tuple[float, float, int], ...] | list,
                  accountant: str = "prv") -> None:
    """Raise ValueError naming the first (sigma, q, steps) entry outside the ranges
    `accountant` is run on (sigma in `sigma_range(accountant)`, q in (0, 1], 1..`max_steps`
    steps in all, at most `MAX_ENTRIES` entries)."""
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"DP history of {len(entries)} entries, at most {MAX_ENTRIES}")
    low, high = sigma_range(accountant)
    total = 0
    for i, (sigma, q, steps) in enumerate(entries):
        if not low <= sigma <= high:
            raise ValueError(f"DP history entry {i}: noise multiplier {sigma!r} is outside "
                             f"[{low:g}, {high:g}] ({accountant} accountant)")
        if not 0.0 < q <= 1.0:
            raise ValueError(f"DP history entry {i}: sample rate {q!r} is outside (0, 1]")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"DP history entry {i}: steps {steps!r} is not a positive integer")
        total += int(steps)
    if total > max_steps(accountant):
        raise ValueError(f"DP history of {total} steps, at most {max_steps(accountant)} "
                         f"({accountant} accountant)")


def epsilon_of(history: DPHistory, delta: float, accountant: str) -> float | None:
    """Epsilon at `delta` after `history` (None before any step). For PRV this is the
    accountant's upper bound, never its point estimate. Raises ValueError for a history
    outside `check_history`'s ranges."""
    if not history.entries:
        return None
    entries = tuple(history.entries)
    check_history(entries, accountant)
    return _epsilon(grouped(entries), delta, accountant)


def grouped(entries: tuple[tuple[float, float, int], ...]) -> tuple[tuple[float, float, int], ...]:
    """`entries` with the steps of each (sigma, q) summed, in order of first appearance.
    Composition commutes, so the epsilon is the same; PRV's cost grows with the entries it
    composes (a split run's alternating DP-SGD and smashed entries, 10 rounds x 2: 13-18 s
    as 20 entries, one pair of entries after grouping)."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in entries:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + int(n)
    return tuple((sigma, q, n) for (sigma, q), n in steps.items())


# Opacus' PRV default error bound (absolute), and the relative bound fedtune keeps to.
PRV_DEFAULT_ERROR = 0.01
PRV_RELATIVE_ERROR = 0.004
# The tightest absolute bound asked for: the grid, and the time and memory, grow as its
# inverse (a node's claim of 10^7 examples, q 3.2e-6, epsilon 1e-4, 1,000 steps: 1e-4 took
# 5.9 s and 1.1 GB, 1e-3 0.6 s and 120 MB). Below epsilon 0.25 the bound is then looser than
# PRV_RELATIVE_ERROR (an upper bound all the same).
PRV_ERROR_FLOOR = 1e-3


@functools.lru_cache(maxsize=1024)
def _epsilon(entries: tuple[tuple[float, float, int], ...], delta: float, accountant: str
             ) -> float:
    """Cached: the server recomputes each charged client's epsilon every round it settles,
    mostly for histories it has seen before. Opacus' accountant, composed from its public
    analysis functions (`bounded_accountant`: the same figures); a PRV grid past
    `PRV_MAX_POINTS` is accounted by RDP instead (`past_cost_bound`)."""
    epsilon = bounded_epsilon(entries, delta, accountant)
    if (accountant == "prv" and not past_cost_bound(entries, delta)
            and PRV_DEFAULT_ERROR > PRV_RELATIVE_ERROR * epsilon):
        # PRV's upper bound sits up to eps_error (absolute) above the true epsilon: 0.01
        # by default, +1.4% at epsilon 0.7 against an independent PLD accountant.
        # Tighten it where that default is a large share of the value (within the grid's
        # bound: a looser bound is an upper bound all the same).
        error = tightest_error(entries, delta,
                               max(PRV_RELATIVE_ERROR * epsilon, PRV_ERROR_FLOOR))
        if error < PRV_DEFAULT_ERROR:
            epsilon = prv_epsilon(entries, delta, error)
    return epsilon


def past_cost_bound(entries: tuple[tuple[float, float, int], ...], delta: float) -> bool:
    """Whether PRV's grid for `entries` (grouped) passes `PRV_MAX_POINTS`, so that
    `epsilon_of` accounts them by RDP."""
    return not affordable(tuple(entries), delta)


# Noise calibrations left to the current `calibration_budget` (None: no budget). Each one
# is Opacus' search, 13-25 accountant calls: 2-6 s on the loaded 2-core box at 500 steps.
_CALIBRATIONS_LEFT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "calibrations_left", default=None)


class CalibrationBudgetSpent(ValueError):
    """A calibration not made before was asked for with its `calibration_budget` spent."""


@contextlib.contextmanager
def calibration_budget(left: list[int]) -> Iterator[None]:
    """Within it, each `calibrate_noise` not cached takes one from `left[0]` (the caller's
    counter, shared across uses), and one asked for at 0 raises CalibrationBudgetSpent
    before any accountant call: the server bounds the calibrations a discovery's claims
    make (strategies.privacy_ledger), while a plan calibrated before stays free."""
    token = _CALIBRATIONS_LEFT.set(left)
    try:
        yield
    finally:
        _CALIBRATIONS_LEFT.reset(token)


@functools.lru_cache(maxsize=1024)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str) -> float:
    """Smallest noise multiplier (to Opacus' search tolerance, rounding up) whose epsilon
    after `steps` steps at `sample_rate` is at most `target_epsilon` (ValueError past
    `max_steps`: each try of the search accounts them all). Opacus' `get_noise_multiplier`
    with each try's cost bounded (`bounded_accountant.search_noise`: the same answer where
    no try passes `PRV_MAX_POINTS`, more noise where one does). Cached: the search
    can take longer than a whole GPU training round (benchmarks/gpu_check.py), and a
    client asks the same question every round it takes part."""
    if steps > max_steps(accountant):  # each try of the search would account them all
        raise ValueError(f"calibrating the noise over {steps} steps: the {accountant} "
                         f"accountant takes at most {max_steps(accountant)}")
    left = _CALIBRATIONS_LEFT.get()  # only reached on a cache miss: a new calibration
    if left is not None:
        if left[0] <= 0:
            raise CalibrationBudgetSpent(
                f"calibrating the noise for sample rate {sample_rate:.4g} over {steps} "
                "steps: the calibrations allowed here are spent")
        left[0] -= 1
    return float(search_noise(target_epsilon, delta, sample_rate, steps, accountant))
