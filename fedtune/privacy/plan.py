"""What one round of a client's DP-SGD releases, as a pure function of the config and the
client's example count: the client trains by it, and the server charges it when it sends the
instruction (before any reply, so a client that times out, crashes or is rejected is still
charged). Both sides call these functions, so the two counts agree by construction.

`PrivacyPlan` holds the few config values the plan depends on, taken once from the experiment
config: the server's ledger is built from it, never from the whole config."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.config import ExperimentConfig, PrivacyConfig
from fedtune.privacy.accounting import calibrate_noise

Release = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as DPHistory


@dataclass(frozen=True)
class PrivacyPlan:
    """What a run's privacy spend depends on: both levels' settings, the round schedule and
    the population (`of` reads them from an experiment config)."""

    privacy: PrivacyConfig
    rounds: int
    cohort: int  # clients per round
    population: int  # clients in all
    batch_size: int
    local_steps: int
    local_epochs: float

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> PrivacyPlan:
        train = cfg.train
        return cls(privacy=cfg.privacy, rounds=train.rounds, cohort=train.clients_per_round,
                   population=cfg.data.num_clients, batch_size=train.batch_size,
                   local_steps=train.local_steps, local_epochs=train.local_epochs)

    def steps(self, n: int) -> int:
        """Steps a client with `n` examples takes in a round: `train.local_steps`, or with
        `train.local_epochs` > 0 that many passes over its data."""
        if self.local_epochs > 0:
            return max(1, math.ceil(self.local_epochs * n / min(self.batch_size, n)))
        return self.local_steps

    def release(self, n: int) -> Release:
        """The (sigma, q, steps) a client with `n` examples releases in one round of DP-SGD.
        Sigma is `privacy.sample.noise_multiplier`, or calibrated so that a client taking
        part in all `train.rounds` rounds ends at most at `privacy.sample.target_epsilon`."""
        dp = self.privacy.sample
        q = poisson_sample_rate(n, self.batch_size)
        steps = self.steps(n)
        sigma = dp.noise_multiplier or calibrate_noise(
            dp.target_epsilon, dp.delta, q, self.rounds * steps, dp.accountant)
        return float(sigma), q, steps


def local_steps(cfg: ExperimentConfig, n: int) -> int:
    """`PrivacyPlan.steps` of `cfg`."""
    return PrivacyPlan.of(cfg).steps(n)


def poisson_sample_rate(n: int, batch_size: int) -> float:
    """The rate at which Opacus' Poisson loader, built from a DataLoader of `batch_size`
    over `n` examples, includes each example in a batch: one over the loader's number of
    batches, 1 / ceil(n / B). That is at most B / n, and it is the rate the accountant is
    told (a batch of B = n samples every example: rate 1)."""
    return 1.0 / math.ceil(n / min(batch_size, n))


def planned_release(cfg: ExperimentConfig, n: int) -> Release:
    """`PrivacyPlan.release` of `cfg`: what a client with `n` examples releases in a round."""
    return PrivacyPlan.of(cfg).release(n)
