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
from strategies import pipeline
from strategies.delta_fedavg import DeltaFedAvg
from strategies.pipeline import CLIP_TOLERANCE, Round, RoundOutcome, Sent, clip_exact

__all__ = ["CLIP_TOLERANCE", "UserLevelDP", "clip_exact"]

# The DP streams of one round (named with the round: nothing carried between rounds).
COHORT_STREAM, NOISE_STREAM = "user-cohort", "user-noise"


class UserLevelDP:
    """Wraps a `DeltaFedAvg` through its public methods (its roster, plugin hooks,
    instructions and screening); draws the cohort and composes the release from the
    pipeline's steps (`strategies.pipeline`): clip -> weight -> sum -> noise -> release."""

    def __init__(self, inner: DeltaFedAvg, cfg: UserDPConfig, noise_multiplier: float,
                 population: int, reproducible_seed: int | None = None) -> None:
        self.inner = inner
        self.cfg = cfg
        self.noise_multiplier = noise_multiplier
        self.cohort = inner.clients_per_round
        self.population = population
        self.rate = self.cohort / population
        self.reproducible_seed = reproducible_seed
        # Told to every client under client-side clipping (and checked on its delta).
        self.client_clip_norm = cfg.clip_norm if cfg.clipping == "client" else None

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.cfg.clip_norm / self.cohort

    def _source(self, server_round: int, stream: str) -> DPRandom:
        return dp_source(f"{stream}/round-{server_round}", self.reproducible_seed)

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """Poisson cohort: each partition joins independently with probability q."""
        pids = self.inner.partitions()
        joins = self._source(server_round, COHORT_STREAM).bernoulli(len(pids), self.rate)
        chosen = [pid for pid, j in zip(pids, joins, strict=True) if j]
        return self.inner.select(server_round, chosen)

    def configure_train(self, server_round: int, vector: np.ndarray, lr: float,
                        cohort: list[int]) -> Sent:
        return self.inner.configure_train(server_round, vector, lr, cohort,
                                          clip_norm=self.client_clip_norm,
                                          withhold_metrics=self.cfg.withhold_metrics)

    def aggregate_train(self, sent: Sent, replies: Iterable[Message]) -> Round:
        """The released global vector: global + (sum of clipped, weighted deltas) / expected
        cohort + noise. Always a release, whoever replied."""
        screened = self.inner.screen(sent, replies)
        base = np.asarray(sent.vector, dtype=np.float64)
        clipped = pipeline.clip(screened.accepted, self.cfg.clip_norm,
                                client_side=self.cfg.clipping == "client")
        screened = screened.refuse(sent.server_round, clipped.refused)
        summed, norms = pipeline.total(pipeline.weight(clipped), base.size)
        noise = self._source(sent.server_round, NOISE_STREAM).normal(
            base.shape, self.noise_std, dtype=torch.float64).numpy()
        released = pipeline.release(base, summed, self.cohort, noise)
        return Round(released, RoundOutcome.of(
            sent, screened, aggregated_norms=norms,
            no_contribution=not any(n > 0 for n in norms)))
