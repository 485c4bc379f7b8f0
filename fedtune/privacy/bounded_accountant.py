"""Opacus' PRV and RDP accountants, composed from their public analysis functions so that
their cost is known before it is paid and bounded (issue 27: every accounting a reply causes
is finite and fast).

What is slow, measured (2-core box at load ~2, Opacus 1.6; the figures in docs/privacy.md):

- PRV composes on a grid of 2 L / mesh points: the mesh is eps_error / sqrt(N log(12 /
  delta_error) / 2) for N steps in all, and L, the domain's half-width, is RDP's epsilon of
  the history at delta_error / 4 (or of one step at delta_error / (8 N)), plus 3. L grows as
  the noise falls: at sigma 0.1, q 0.01, 500 steps L is ~4,900 (70 M points: ~5 GB asked
  for); at sigma 0.3 it is 84 (1.2 M points, 1.3 s, 550 MB). Time and memory are about
  1-1.5 s and 150 MB per million points. `prv_points` says how many a history needs, from RDP
  alone, and `PRV_MAX_POINTS` bounds them: past it the history is accounted by RDP (an
  upper bound too, larger than PRV's there: epsilon in the hundreds).
- L itself comes from Opacus' RDP analysis at its 150 orders, whose fractional orders sum a
  series that grows with sigma where 0 < q < 1 (sigma 57, q 0.5: ~0.5-1.5 s for one
  (sigma, q)); PRV's domain asks for it 1 + (distinct (sigma, q) pairs) times per call, and
  the ledger recomputes a client's history each round. It is computed here once per
  (sigma, q) (`_rdp_per_step`, cached; RDP is linear in the steps), so a split client's two
  pairs pay it once a run, not every round: a split-mode history after `grouped` took 4.7 s
  a call, 0.1-0.3 s once its pairs are known.

Both accountants give, for a history within the bound, exactly what Opacus' `PRVAccountant`
and `RDPAccountant` give (tests/test_attack29e_accountant_cost.py compares them bit for bit):
the same public functions in the same order.
"""

from __future__ import annotations

import functools
import math

import numpy as np

Entries = tuple[tuple[float, float, int], ...]

# The most grid points one PRV composition may take: ~1 s and ~150 MB on the loaded 2-core
# box. Within the steps bound (500) a history needs more only where its epsilon is in the
# tens to hundreds (sigma 0.3, q 0.01, 500 steps: 1.2 M points, epsilon 50); the tighter
# error bound asked below epsilon 2.5 stays within it there (~0.5 M points at 1e-3), and
# `tightest_error` loosens it where it would not.
PRV_MAX_POINTS = 1_000_000


def _orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one step at each of Opacus' default orders (read-only: it is shared)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_orders())
    rdp.setflags(write=False)
    return rdp


def rdp_epsilon(entries: Entries, delta: float) -> float:
    """Epsilon at `delta` of `entries` by Opacus' RDP accountant (`RDPAccountant.get_epsilon`:
    the sum over the entries of each one's RDP, then its conversion), each (sigma, q)'s RDP
    computed once a process."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum([_rdp_per_step(sigma, q) * steps for sigma, q, steps in entries])
    with np.errstate(divide="ignore", over="ignore"):
        eps, _ = get_privacy_spent(orders=_orders(), rdp=rdp, delta=delta)
    return float(eps)


def _half_width(entries: Entries, eps_error: float, delta_error: float) -> float:
    """Opacus' `compute_safe_domain_size` of `entries`, from the cached RDP."""
    total = sum(steps for _, _, steps in entries)
    half = rdp_epsilon(entries, delta_error / 4)
    for sigma, q, _ in entries:
        half = max(half, rdp_epsilon(((sigma, q, 1),), delta_error / (8 * total)))
    return max(half, eps_error) + 3


def _mesh(entries: Entries, eps_error: float, delta_error: float) -> float:
    """PRVAccountant's mesh: eps_error / sqrt(N log(12 / delta_error) / 2)."""
    total = sum(steps for _, _, steps in entries)
    return eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)


def prv_points(entries: Entries, delta: float, eps_error: float) -> float:
    """Grid points PRV composes `entries` on at `eps_error` (Opacus' default delta_error,
    delta / 1000): its time and memory are proportional to them. inf where RDP is."""
    delta_error = delta / 1000
    half = _half_width(entries, eps_error, delta_error)
    if not math.isfinite(half):
        return math.inf
    return 2 * half / float(_mesh(entries, eps_error, delta_error))


def tightest_error(entries: Entries, delta: float, eps_error: float) -> float:
    """The smallest error bound at least `eps_error` whose grid stays within
    `PRV_MAX_POINTS` (points grow as 1 / eps_error; the half-width barely moves)."""
    points = prv_points(entries, delta, eps_error)
    return eps_error if points <= PRV_MAX_POINTS else eps_error * points / PRV_MAX_POINTS


def prv_epsilon(entries: Entries, delta: float, eps_error: float = 0.01) -> float:
    """Opacus' `PRVAccountant.get_epsilon(delta, eps_error=eps_error)` of `entries` (its
    upper bound), composed from the same public functions in the same order, with the
    domain's RDP from the cache. The caller keeps the grid within `PRV_MAX_POINTS`."""
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    delta_error = delta / 1000
    half = _half_width(entries, eps_error, delta_error)
    domain = Domain.create_aligned(-half, half, _mesh(entries, eps_error, delta_error))
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in entries]
    with np.errstate(divide="ignore"):  # log(1 - q) = -inf at q = 1, by design
        dprvs = [discretize(TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max),
                            domain) for prv in prvs]
        dprv = compose_heterogeneous(dprvs=dprvs,
                                     num_self_compositions=[n for _, _, n in entries])
        _, _, upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    return float(upper)


def affordable(entries: Entries, delta: float) -> bool:
    """Whether PRV composes `entries` within `PRV_MAX_POINTS` at its default error bound."""
    return prv_points(entries, delta, 0.01) <= PRV_MAX_POINTS


def bounded_epsilon(entries: Entries, delta: float, accountant: str) -> float:
    """Epsilon of `entries` by `accountant` at its default error bound, or by RDP where PRV's
    grid passes `PRV_MAX_POINTS` (an upper bound, and larger than PRV's there)."""
    if accountant == "prv" and affordable(entries, delta):
        return prv_epsilon(entries, delta)
    return rdp_epsilon(entries, delta)


def search_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                 accountant: str) -> float:
    """Opacus' `get_noise_multiplier` (the same tries in the same order, the same
    tolerance, the same answer) with each try accounted by `bounded_epsilon`: where a try's
    PRV grid would pass `PRV_MAX_POINTS` (a large target epsilon takes the search down to
    sigmas near 0.1 and below: target 100 at q 0.01 over 500 steps took 22 s and 2.3 GB)
    RDP's larger epsilon decides it, which can only move the answer up (more noise)."""
    from opacus.accountants.utils import MAX_SIGMA

    def epsilon(sigma: float) -> float:
        return bounded_epsilon(((sigma, sample_rate, steps),), delta, accountant)

    eps_high = float("inf")
    sigma_low, sigma_high = 0, 10
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = epsilon(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > 0.01:  # Opacus' default epsilon_tolerance
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high
