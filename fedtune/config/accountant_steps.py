"""How many DP-SGD steps each accountant is run on, and the operator's plan checked against
it before start-up. Torch-free (the preflight reads it before Ray starts; `fedtune.privacy`
imports torch)."""

from __future__ import annotations

from fedtune.config.errors import ConfigError
from fedtune.config.schema import ExperimentConfig

# Steps in all, per accountant. RDP's cost does not grow with them (10^8 steps: 0.01 s, no
# memory to speak of). PRV composes on a grid that grows with them: 20 steps ~0.1 s, 500
# ~0.4 s and ~100 MB, 1,000 ~1.3 s and ~230 MB, 2,000 ~8 s and 1.3 GB, 20,000 ~34 s and 2.9 GB,
# 1.25 M (a node's claim of 10^7 examples at train.local_epochs=1) over 20 GB (2-core box
# at load ~5, so times ~2x an idle one's; sigma 2.5, q 1 and 0.25): bounded where one
# call stays near 1 s and a few hundred MB. A plan past it is refused at config time (the
# operator's) or at discovery (a node's claim); the RDP accountant takes longer runs.
MAX_STEPS = {"prv": 500, "rdp": 10**8}


def max_steps(accountant: str) -> int:
    """The most steps a history accounted by `accountant` may hold (`MAX_STEPS`)."""
    return MAX_STEPS.get(accountant, min(MAX_STEPS.values()))


def check_planned_steps(cfg: ExperimentConfig) -> None:
    """Raise ConfigError naming the keys when a client's DP-SGD plan over the run, told from
    the config alone (train.rounds x train.local_steps), passes the steps
    privacy.sample.accountant takes (`max_steps`): before start-up, not at discovery. A plan
    by train.local_epochs depends on the partitions' sizes: the server checks it at
    discovery (`PrivacyLedger.use_example_counts`)."""
    dp, train = cfg.privacy.sample, cfg.train
    if not dp.enabled or train.local_epochs > 0:
        return
    steps, most = train.rounds * train.local_steps, max_steps(dp.accountant)
    if steps > most:
        raise ConfigError(
            f"train.rounds={train.rounds} x train.local_steps={train.local_steps} = {steps} "
            f"DP-SGD steps per client, more than the {dp.accountant} accountant takes ({most}, "
            "privacy.sample.accountant): lower them or set privacy.sample.accountant=rdp")
