"""User-level DP (DP-FedAvg) on delta vectors, end to end: Poisson cohort, clipping, equal
weights, sum over the expected cohort, Gaussian noise.

Each round every partition joins independently with probability q = cohort / population.
Each accepted delta is clipped to L2 norm C (server side; with client-side clipping the
server rejects any delta over C and clips the rest again, so float rounding cannot lift the
bound); a plugin weight in [0, 1] may only shrink it. The sum is divided by the expected
cohort, not by who replied, and gets noise N(0, (sigma C / cohort)^2): one client moves the
release by at most C / cohort whoever else fails. Every round is a release, also one in
which nobody contributed. Accounting: `fedtune.privacy.user_level`.

The cohort draw and the noise are DP randomness: drawn from `fedtune.privacy.randomness`
(256-bit keys from the OS CSPRNG, fresh per round and draw), never stored or sent. With
`privacy.reproducible_noise` they derive statelessly from (seed, round), so a killed and
resumed run draws the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.config import UserDPConfig
from fedtune.privacy.randomness import DPRandom, dp_source
from strategies.delta_fedavg import DeltaFedAvg

# Client-side clipping is checked to this relative tolerance (float32 rounding of the norm).
CLIP_TOLERANCE = 1e-5
# The DP streams of one round (named with the round: nothing carried between rounds).
COHORT_STREAM, NOISE_STREAM = "user-cohort", "user-noise"


def clip_exact(delta: np.ndarray, clip_norm: float) -> np.ndarray:
    """`delta` in float64, scaled down to norm at most `clip_norm`."""
    out = np.asarray(delta, dtype=np.float64)
    norm = float(np.linalg.norm(out))
    if norm > clip_norm:
        out = out * (clip_norm / norm)
        # One more shrink if rounding left it a hair over.
        over = float(np.linalg.norm(out))
        if over > clip_norm:
            out = out * np.nextafter(clip_norm / over, 0.0)
    return out


class UserLevelDP:
    """Wraps a `DeltaFedAvg`: its screening and plugin hooks, our sampling and release."""

    def __init__(self, inner: DeltaFedAvg, cfg: UserDPConfig, noise_multiplier: float,
                 population: int, reproducible_seed: int | None = None) -> None:
        self.inner = inner
        self.cfg = cfg
        self.noise_multiplier = noise_multiplier
        self.cohort = inner.clients_per_round
        self.population = population
        self.rate = self.cohort / population
        self.reproducible_seed = reproducible_seed
        inner.clip_norm = cfg.clip_norm if cfg.clipping == "client" else None
        inner.withhold_metrics = cfg.withhold_metrics

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.cfg.clip_norm / self.cohort

    def _source(self, server_round: int, stream: str) -> DPRandom:
        return dp_source(f"{stream}/round-{server_round}", self.reproducible_seed)

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """Poisson cohort: each partition joins independently with probability q."""
        self.inner.require_roster()
        pids = sorted(self.inner.roster)
        joins = self._source(server_round, COHORT_STREAM).bernoulli(len(pids), self.rate)
        chosen = [pid for pid, j in zip(pids, joins, strict=True) if j]
        return self.inner.select_cohort(server_round, chosen)

    def configure_train(self, server_round: int, vector: np.ndarray, lr: float,
                        cohort: list[int]) -> list[Message]:
        return self.inner.configure_train(server_round, vector, lr, cohort)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> np.ndarray:
        """The released global vector: global + (sum of clipped, weighted deltas) / expected
        cohort + noise. Always a release, whoever replied."""
        inner = self.inner
        accepted = inner.screen(server_round, replies)
        base = np.asarray(inner.global_vector, dtype=np.float64)
        clip = self.cfg.clip_norm
        total = np.zeros_like(base)
        norms = []
        for item in accepted:
            norm = float(np.linalg.norm(item.delta.astype(np.float64)))
            if self.cfg.clipping == "client" and norm > clip * (1 + CLIP_TOLERANCE):
                inner.reject(server_round, item, f"delta norm {norm:.6g} exceeds "
                             f"privacy.user.clip_norm={clip} (client-side clipping)")
                continue
            # Clip first, then weight: a weight <= 1 can only shrink what one client adds.
            contribution = clip_exact(item.delta, clip) * item.entry["weight"]
            norms.append(float(np.linalg.norm(contribution)))
            total += contribution
        inner.outcome.aggregated_norms = norms
        inner.outcome.no_contribution = not any(n > 0 for n in norms)
        noise = self._source(server_round, NOISE_STREAM).normal(
            base.shape, self.noise_std, dtype=torch.float64).numpy()
        return (base + total / self.cohort + noise).astype(np.float32)
