"""ATTACK29E: the operator's plan check (`check_planned_steps`, run by `fedtune run`'s
preflight) counted only train.rounds x train.local_steps. A split run with smashed DP charges
its split steps too, and the ledger charges every example count a plugin lets a client
train on (under a secret cohort only, then), so a plan preflight admitted reached PRV's steps bound
mid-run and ended at a budget stop. Preflight now counts every release the ledger charges:
a plan it admits runs its planned rounds with no steps-bound stop, one past it is refused in
one line naming the keys."""

import numpy as np
import pytest
from ledger_rounds import first_stop

import strategies.plugins  # noqa: F401 (registers the plugins and their sizes)
from fedtune.config import ConfigError, load_config
from fedtune.config.accountant_steps import check_planned_steps
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from fedtune.run.preflight import preflight
from fedtune.split.plan import smashed_privacy_events
from strategies.plugins.base import build_plugins
from strategies.privacy_ledger import PrivacyLedger

SIZES = [64, 48]
# Given noise (no calibration) and a target no round reaches: only the steps bound stops.
BASE = ["data.num_clients=2", "train.clients_per_round=2", "train.batch_size=16",
        "privacy.sample.noise_multiplier=3.0", "privacy.sample.target_epsilon=1000",
        "privacy.sample.accountant=prv"]
SPLIT = ["split.enabled=true", "split.cut_layer=1", "split.smashed_dp.enabled=true",
         "split.smashed_dp.noise_multiplier=3.0"]
SECRET = ["privacy.user.enabled=true", "privacy.user.noise_multiplier=1.0",
          "privacy.user.target_epsilon=1000"]
PRUNING = {"name": "el2n_pruning", "keep": 0.5, "allow_with_sample_dp": True}


def _config(sets, plugins=()):
    cfg = load_config(None, [*BASE, *sets])
    cfg.plugins.extend(dict(p) for p in plugins)
    return cfg


def _steps_bound_stop(cfg):
    """The first stop of a run of cfg's planned rounds, both clients sampled every round,
    charged as the server charges them (its hooks), or None."""
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    if cfg.split.enabled:
        ledger.releases.plan_hooks.append(lambda rnd, pid, n: smashed_privacy_events(cfg, n))
    ledger.releases.size_hooks += [plugin.trained_sizes for plugin in build_plugins(cfg)]
    return first_stop(ledger, state, cfg.train.rounds, [0, 1])


@pytest.mark.parametrize("sets, plugins, at_bound", [
    # 10 rounds x (25 DP-SGD + 25 smashed-data steps) = 500: PRV's bound exactly.
    (["train.rounds=10", "train.local_steps=25", *SPLIT], (), True),
    # local_loss_fraction 0.5: 10 rounds x (20 + 10 split steps) = 300.
    (["train.rounds=10", "train.local_steps=20", "split.local_loss_fraction=0.5", *SPLIT],
     (), False),
    # Secret cohort, pruning: 10 rounds x 50 on the kept share = 500 (its one count).
    (["train.rounds=10", "train.local_steps=50", *SECRET], (PRUNING,), True),
])
def test_a_plan_preflight_admits_runs_its_rounds_and_one_more_step_is_refused(
        sets, plugins, at_bound):
    from fedtune.config.accountant_steps import planned_steps

    cfg = _config(sets, plugins)
    check_planned_steps(cfg)  # admitted
    assert _steps_bound_stop(cfg) is None
    steps, _ = planned_steps(cfg)
    if at_bound:
        assert steps == 500
    more = _config([*sets, f"train.rounds={cfg.train.rounds + 1}"], plugins)
    if planned_steps(more)[0] > 500:
        with pytest.raises(ConfigError):
            check_planned_steps(more)
        assert _steps_bound_stop(more) is not None  # what main met mid-run


def test_a_split_plan_past_the_bound_is_refused_before_start_naming_the_keys():
    """10 rounds x 30 steps = 300 DP-SGD steps (main's count: admitted) and 300 smashed-data
    steps: 600 PRV steps. Main admitted it; its run stopped at round 9."""
    sets = ["train.rounds=10", "train.local_steps=30", *SPLIT]
    cfg = _config(sets)
    assert "past what the prv accountant accounts" in (_steps_bound_stop(cfg) or "")  # main
    with pytest.raises(ConfigError) as refused:
        check_planned_steps(cfg)
    text = str(refused.value)
    assert "\n" not in text
    for key in ("train.rounds=10", "train.local_steps=30", "split.smashed_dp.enabled",
                "split.local_loss_fraction", "privacy.sample.accountant", "= 600"):
        assert key in text, (key, text)
    with pytest.raises(ConfigError, match="smashed"):  # `fedtune run`'s preflight
        preflight(cfg)


@pytest.mark.parametrize("secret", [True, False])
def test_a_plugin_of_two_counts_is_counted_at_each_in_every_mode(secret, monkeypatch):
    """6 rounds x 50 steps = 300 at one count; a plugin whose client may train on either of
    two counts a round is charged both every round (strategies.release_plan: ATTACK29G),
    with or without a secret cohort: 600, refused by the preflight and stopped by the
    ledger alike. el2n_pruning trains on one (its kept share); here it is made to declare
    two, the old all-then-kept plan."""
    from fedtune.config import accountant_steps
    from strategies.plugins.el2n import EL2NPruning

    monkeypatch.setitem(accountant_steps._TRAINED_SIZES, "el2n_pruning", lambda table: 2)
    monkeypatch.setattr(EL2NPruning, "trained_sizes", lambda self, n: [n, max(1, n // 2)])
    sets = ["train.rounds=6", "train.local_steps=50", *(SECRET if secret else [])]
    with pytest.raises(ConfigError, match=r"el2n_pruning.*each charged every round"):
        check_planned_steps(_config(sets, [PRUNING]))
    assert _steps_bound_stop(_config(sets, [PRUNING])) is not None
    three = ["train.rounds=5", "train.local_steps=50", *(SECRET if secret else [])]
    check_planned_steps(_config(three, [PRUNING]))  # 5 x 100 = 500: admitted, and runs
    assert _steps_bound_stop(_config(three, [PRUNING])) is None


def test_population_expansion_adds_no_release():
    """population_expansion only weights and selects (no size, no step of its own): its
    plan counts as the same plan without it."""
    from fedtune.config.accountant_steps import planned_steps

    sets = ["train.rounds=10", "train.local_steps=50", *SECRET]
    expansion = {"name": "population_expansion", "weighting": "fixed", "lam": 0.5}
    assert planned_steps(_config(sets, [expansion]))[0] == planned_steps(_config(sets))[0] \
        == 500
