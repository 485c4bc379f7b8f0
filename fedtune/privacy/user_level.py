"""Client-level (user-level) DP accounting: one Poisson-subsampled Gaussian release per round.

Each round samples every client independently with rate q = cohort / population; the mean
of clipped deltas (norm <= C, divided by the expected cohort) gets Gaussian noise of std
sigma * C / cohort, so adding or removing one client's data changes the sum by at most C:
a sampled Gaussian mechanism with noise multiplier sigma. Epsilon comes from Flower's RDP
accountant (Google's dp-accounting underneath), composed once per round that ran.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

# Flower's public ServerApp API re-exports its privacy accounting (1.41 and 1.42).
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)

ACCOUNTANT = "rdp (flwr RdpAccountant / dp-accounting), poisson, add-or-remove-one"


class _DropExcludedOrderNotes(logging.Filter):
    """dp-accounting logs a warning for every fractional RDP order whose series does not
    converge; it leaves that order out, which can only raise the epsilon it reports."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropExcludedOrderNotes())


@dataclass
class UserLevelAccount:
    """The run's client-level privacy spend: `releases` rounds of (sigma, q)."""

    noise_multiplier: float
    cohort: int
    population: int
    delta: float
    releases: int = 0

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.population

    def _accountant(self, releases: int) -> RdpAccountant:
        acc = RdpAccountant(PrivacyConfig(
            target_delta=self.delta, population_size=self.population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON))
        if releases:
            acc.compose(GaussianPrivacyEvent(self.noise_multiplier, self.cohort,
                                             self.population), count=releases)
        return acc

    def epsilon(self, releases: int | None = None) -> float | None:
        """Epsilon at `delta` after `releases` rounds (default: those so far)."""
        n = self.releases if releases is None else releases
        return self._accountant(n).get_epsilon(self.delta) if n else None

    def record(self) -> None:
        self.releases += 1

    def params(self) -> dict[str, object]:
        """Everything needed to recompute the epsilon, for the ledger."""
        return {"accountant": ACCOUNTANT, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "cohort": self.cohort,
                "population": self.population, "rounds": self.releases, "delta": self.delta}


def calibrate_user_noise(target_epsilon: float, delta: float, cohort: int, population: int,
                         rounds: int, tolerance: float = 1e-3) -> float:
    """Smallest noise multiplier (to `tolerance`, rounding up) whose client-level epsilon
    after `rounds` Poisson-sampled rounds is at most `target_epsilon`."""
    def eps(sigma: float) -> float:
        return UserLevelAccount(sigma, cohort, population, delta).epsilon(rounds) or 0.0

    low, high = 0.05, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches epsilon {target_epsilon} "
                             f"at delta {delta} over {rounds} rounds")
    while high - low > tolerance:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
