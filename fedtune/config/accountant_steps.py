"""How many DP-SGD steps each accountant is run on, and the operator's plan checked against
it before start-up. Torch-free (the preflight reads it before Ray starts; `fedtune.privacy`
imports torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedtune.config.errors import ConfigError
from fedtune.config.schema import ExperimentConfig
from fedtune.config.sigma import (  # noqa: F401 (re-exported: the privacy package reads them here)
    DEFAULT_SIGMA_FLOOR,
    SIGMA_FLOOR,
    SIGMA_MAX,
    sigma_range,
)

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


# Plugin name -> how many example counts a client may train on in one round under it, from
# its [[plugins]] table alone (the server charges each every round). Declared by
# the app layer as each plugin registers (`strategies.plugins.base.register_plugin`), so the
# config never imports it; a plugin not declared trains on one.
_TRAINED_SIZES: dict[str, Callable[[dict[str, Any]], int]] = {}


def declare_trained_sizes(plugin: str, sizes: Callable[[dict[str, Any]], int]) -> None:
    """Record how many example counts a client trains on in one round under `plugin`."""
    _TRAINED_SIZES[plugin] = sizes


def planned_steps(cfg: ExperimentConfig) -> tuple[int, str]:
    """The steps a client's sample-level history takes over the run by the config alone, and
    how they add up (naming the keys), counting every release the server charges a round:
    DP-SGD's train.local_steps, once per example count plugins let it train on (the ledger
    charges each every round: strategies.release_plan), and split
    mode's smashed-data steps (split.smashed_dp: the split steps,
    train.local_steps - int(split.local_loss_fraction x train.local_steps), each one more
    release of the same batch). Interrupted attempts (a kill and a resume) add a round each."""
    train = cfg.train
    parts = [f"train.local_steps={train.local_steps}"]
    per_round = train.local_steps
    sizes = 1  # each plugin maps every count a client may train on to its own counts
    for table in cfg.plugins:
        sizes *= _TRAINED_SIZES.get(str(table.get("name")), lambda _: 1)(table)
    if sizes > 1:
        names = ", ".join(sorted({str(t.get("name")) for t in cfg.plugins}))
        per_round += (sizes - 1) * train.local_steps
        parts.append(f"{sizes - 1} x {train.local_steps} for the other example counts "
                     f"plugins [{names}] may train on (each charged every round)")
    if cfg.split.enabled and cfg.split.smashed_dp.enabled:
        split = train.local_steps - int(cfg.split.local_loss_fraction * train.local_steps)
        per_round += split
        parts.append(f"{split} smashed-data steps (split.smashed_dp.enabled, "
                     f"split.local_loss_fraction={cfg.split.local_loss_fraction})")
    return train.rounds * per_round, f"train.rounds={train.rounds} x ({' + '.join(parts)})"


def check_planned_steps(cfg: ExperimentConfig) -> None:
    """Raise ConfigError naming the keys when a client's DP plan over the run, told from the
    config alone (`planned_steps`: DP-SGD's steps, every example count plugins may train
    on, split mode's smashed-data steps), passes the steps
    privacy.sample.accountant takes (`max_steps`), or a given noise multiplier (DP-SGD's,
    split mode's smashed data's) is outside the range it is run on (`sigma_range`): before
    start-up, not mid-run. A plan by train.local_epochs depends on the partitions' sizes: the
    server checks it at discovery (`PrivacyLedger.use_example_counts`)."""
    dp, train = cfg.privacy.sample, cfg.train
    if not dp.enabled:
        return
    low, high = sigma_range(dp.accountant)
    given = {"privacy.sample.noise_multiplier": dp.noise_multiplier}
    if cfg.split.enabled and cfg.split.smashed_dp.enabled:
        given["split.smashed_dp.noise_multiplier"] = cfg.split.smashed_dp.noise_multiplier
    for key, sigma in given.items():
        if sigma > 0 and not low <= sigma <= high:  # 0: calibrated (checked at discovery)
            raise ConfigError(f"{key}={sigma:g} is outside [{low:g}, {high:g}], the noise the "
                              f"{dp.accountant} accountant takes (privacy.sample.accountant): "
                              "raise it, or set privacy.sample.accountant=rdp")
    if train.local_epochs > 0:
        return
    (steps, how), most = planned_steps(cfg), max_steps(dp.accountant)
    if steps > most:
        raise ConfigError(
            f"{how} = {steps} DP steps per client, more than the {dp.accountant} accountant "
            f"takes ({most}, privacy.sample.accountant): lower them or set "
            "privacy.sample.accountant=rdp")
