"""Differential privacy: Opacus DP-SGD on clients and the accountants behind every epsilon."""

from fedtune.privacy.accounting import DPHistory, calibrate_noise, epsilon_of
from fedtune.privacy.dpsgd import PrivateTraining, make_private
from fedtune.privacy.plan import local_steps, planned_release, poisson_sample_rate

__all__ = ["DPHistory", "PrivateTraining", "calibrate_noise", "epsilon_of", "local_steps",
           "make_private", "planned_release", "poisson_sample_rate"]
