"""What one round of a client's DP-SGD releases, as a pure function of the config and the
client's example count: the client trains by it, and the server charges it when it sends the
instruction (before any reply, so a client that times out, crashes or is rejected is still
charged). Both sides call these functions, so the two counts agree by construction."""

from __future__ import annotations

import math

from fedtune.config import ExperimentConfig
from fedtune.privacy.accounting import calibrate_noise

Release = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as DPHistory


def local_steps(cfg: ExperimentConfig, n: int) -> int:
    """Steps a client with `n` examples takes in a round: `train.local_steps`, or with
    `train.local_epochs` > 0 that many passes over its data."""
    if cfg.train.local_epochs > 0:
        return max(1, math.ceil(cfg.train.local_epochs * n / min(cfg.train.batch_size, n)))
    return cfg.train.local_steps


def poisson_sample_rate(n: int, batch_size: int) -> float:
    """The rate at which Opacus' Poisson loader, built from a DataLoader of `batch_size`
    over `n` examples, includes each example in a batch: one over the loader's number of
    batches, 1 / ceil(n / B). That is at most B / n, and it is the rate the accountant is
    told (a batch of B = n samples every example: rate 1)."""
    return 1.0 / math.ceil(n / min(batch_size, n))


def planned_release(cfg: ExperimentConfig, n: int) -> Release:
    """The (sigma, q, steps) a client with `n` examples releases in one round of DP-SGD.
    Sigma is `privacy.sample.noise_multiplier`, or calibrated so that a client taking part
    in all `train.rounds` rounds ends at most at `privacy.sample.target_epsilon`."""
    dp = cfg.privacy.sample
    q = poisson_sample_rate(n, cfg.train.batch_size)
    steps = local_steps(cfg, n)
    sigma = dp.noise_multiplier or calibrate_noise(
        dp.target_epsilon, dp.delta, q, cfg.train.rounds * steps, dp.accountant)
    return float(sigma), q, steps
