"""ATTACK32 (found while probing epsilons that `rounded_up` cannot print, inf/NaN; not in
ATTACK31's diff): `privacy.user.noise_multiplier` has no floor (`require_nonnegative`, the
bounds table's (0, 1e6)), unlike sample-level DP's `sigma_range`, and below about 1e-151
the user-level accountant (dp-accounting's RDP, `UserLevelAccount`) computes NaN inside and
returns epsilon 0.0: a run with `privacy.user.noise_multiplier = 1e-152` passes
`check_user_budget` (0.0 <= target) and records epsilon_user 0.0 every round while its
noise (std = sigma x clip / cohort, about 1e-152) is none at all. At sigma 1e-150 the same
accountant gives 5.5e299: less noise reports less epsilon."""

import warnings

from fedtune.config import ConfigError, load_config
from fedtune.privacy.user_level import UserLevelAccount
from fedtune.sim.driver import check_user_budget

SETS = ["privacy.user.enabled=true", "privacy.sample.enabled=false"]


def _epsilon(sigma: float, cfg) -> float | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # dp-accounting's own overflow
        return UserLevelAccount(sigma, cfg.train.clients_per_round, cfg.data.num_clients,
                                cfg.privacy.user.delta).epsilon(1)


def test_a_vanishing_user_noise_is_refused_or_never_reported_as_less_epsilon():
    """Adversary: whoever sees the models (user DP); breaks THREATS 2 and 8: no noise, eps 0."""
    try:
        cfg = load_config(None, [*SETS, "privacy.user.noise_multiplier=1e-152"])
        check_user_budget(cfg)
    except ConfigError:
        return  # refused before any round: holds
    tiny, larger = _epsilon(1e-152, cfg), _epsilon(1e-150, cfg)
    assert tiny is not None and tiny >= larger, (
        f"accepted noise_multiplier=1e-152 reports epsilon_user {tiny!r} after one round; "
        f"1e-150 reports {larger!r}")
