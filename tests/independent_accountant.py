"""An accountant independent of the one fedtune runs (Google's dp-accounting PLD), for tests
that check a reported epsilon is never below what was really released."""

from __future__ import annotations

from collections.abc import Iterable

from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant


def pld_epsilon(entries: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of Poisson-subsampled Gaussian releases (sigma, q, steps)."""
    acc = PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in entries:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)),
                    int(steps))
    return acc.get_epsilon(delta)
