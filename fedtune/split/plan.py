"""What a split client with n examples releases under smashed DP in one round, as a pure
function of the config and n: the client trains by it and the server charges it when it asks
the client to train (next to DP-SGD's `fedtune.privacy.plan.planned_release`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.config import ExperimentConfig
from fedtune.privacy import calibrate_noise, planned_release
from fedtune.privacy.plan import Release
from fedtune.split.smashed_dp import joint_multiplier, pair_multiplier, slot_count


@dataclass(frozen=True)
class SmashedPlan:
    """What a client with n examples does and spends under smashed DP, per round."""

    sigma: float  # smashed-data noise multiplier (activations and gradients)
    dpsgd_sigma: float  # DP-SGD's, which the joint event includes
    joint_multiplier: float  # one split step as one Gaussian
    sample_rate: float  # the Poisson rate of the DP-SGD batches
    split_steps: int  # split steps per round
    slots: int  # rows each split step sends


def smashed_plan(cfg: ExperimentConfig, n: int) -> SmashedPlan:
    """The smashed-DP plan of a client with `n` examples: a pure function of the config and
    n, so the server computes a split client's planned spend itself."""
    dp, smashed = cfg.privacy.sample, cfg.split.smashed_dp
    # The DP-SGD release of the same steps: its rate is the Poisson batches' rate.
    dpsgd, q, steps = planned_release(cfg, n)
    split_steps = steps - int(cfg.split.local_loss_fraction * steps)
    # Calibrated so the smashed pair alone, over the run's planned split steps, is at the
    # target; the joint event (with DP-SGD) then accounts for both together.
    sigma = smashed.noise_multiplier or math.sqrt(2.0) * calibrate_noise(
        smashed.target_epsilon, dp.delta, q, cfg.train.rounds * split_steps, dp.accountant)
    return SmashedPlan(sigma=sigma, dpsgd_sigma=dpsgd,
                       joint_multiplier=joint_multiplier(pair_multiplier(sigma), dpsgd),
                       sample_rate=q, split_steps=split_steps,
                       slots=slot_count(cfg.train.batch_size))


def smashed_privacy_events(cfg: ExperimentConfig, n: int) -> list[Release]:
    """A split client's planned smashed-DP events for one round, as (sigma, q, steps): what
    the server charges a client with n examples that it asks to train (empty when the
    smashed data goes up in clear)."""
    if not (cfg.split.enabled and cfg.split.smashed_dp.enabled):
        return []
    plan = smashed_plan(cfg, n)
    return [(plan.joint_multiplier, plan.sample_rate, plan.split_steps)]
