"""Differential privacy: Opacus DP-SGD on clients and the accountants behind every epsilon."""

from fedtune.privacy.accounting import DPHistory, calibrate_noise, epsilon_of
from fedtune.privacy.dpsgd import PrivateTraining, make_private

__all__ = ["DPHistory", "PrivateTraining", "calibrate_noise", "epsilon_of", "make_private"]
