"""What a user-level release says of the strategy plugins' round extras: under
`privacy.user` (log_cohorts off) every extra is the curator's (`fedtune.run.curator_log`)
unless its plugin declares it release-safe, and no release-safe extra depends on who was
in the cohort (issue 26's class: the cohort's size and make-up are secret)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from fedtune.config import load_config
from fedtune.config.load import config_from_toml
from fedtune.run.curator_log import MOVED_NOTE, declare_plugin_extras, split_record
from fedtune.wire.protocol import TrainReport
from strategies.pipeline import ClientReport
from strategies.plugins.base import Plugin, available_plugins, build_plugins, plugin_class

LM_EXPANSION_USER_DP = """
[task]
kind = "causal_lm"
[data]
partition = "natural"
by = "mailing_list"
domain_by = "mailing_list"
target_domain = ["forteana", "social"]
target_clients = 2
num_clients = 6
[train]
clients_per_round = 3
[privacy.sample]
enabled = false
[privacy.user]
enabled = true
[[plugins]]
name = "population_expansion"
weighting = "fixed"
"""

EL2N_USER_DP = """
[data]
num_clients = 6
[train]
clients_per_round = 3
[privacy.sample]
enabled = false
[privacy.user]
enabled = true
[[plugins]]
name = "el2n_pruning"
keep = 0.5
"""

IMPORTANCE_USER_DP = """
[data]
partition = "iid"
domain_by = "collection"
target_domain = "set2"
target_clients = 2
num_clients = 6
[train]
clients_per_round = 3
[tuning]
domain_head = true
[privacy.sample]
enabled = false
[privacy.user]
enabled = true
[[plugins]]
name = "population_expansion"
weighting = "importance"
"""

# One config per registered plugin, under user-level DP.
CONFIGS = {"population_expansion": (LM_EXPANSION_USER_DP, IMPORTANCE_USER_DP),
           "el2n_pruning": (EL2N_USER_DP,)}


def _numbers(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{path}.{key}" if path else key)
    elif isinstance(node, bool):
        return
    elif isinstance(node, int | float):
        yield path, node


def _report(pid: int, n: int) -> ClientReport:
    """A report with every optional plugin figure, scaled by `n`."""
    extras = {"examples-available": 10 * n, "examples-kept": 5 * n, "rescored": n % 2,
              "scoring-flops": 1e6 * n, "flops-saved": 2e5 * n, "importance-weight": 0.5 * n}
    return ClientReport(pid, TrainReport(steps=4, examples_seen=5 * n, extras=extras))


def _released(text: str, reports: list[ClientReport]) -> tuple[dict, dict | None]:
    cfg = config_from_toml(text)
    record: dict[str, Any] = {"round": 1, "clients": len(reports), "sampled": len(reports)}
    for plugin in build_plugins(cfg):
        record.update(plugin.round_extras(1, reports))
    return split_record(record, cfg)


def test_the_release_says_nothing_of_the_secret_cohorts_make_up():
    """Invariant: under privacy.user (log_cohorts off) a round's released record holds no
    count of the cohort's members, the expansion plugin's extras included (LMATTACK2 1)."""
    cfg = config_from_toml(LM_EXPANSION_USER_DP)
    plugins = build_plugins(cfg)
    # This round's secret Poisson cohort: target list 0, source lists 3 and 5.
    reports = [ClientReport(pid, TrainReport(steps=4)) for pid in (0, 3, 5)]
    record = {"round": 1, "clients": len(reports), "sampled": len(reports)}
    for plugin in plugins:
        record.update(plugin.round_extras(1, reports))
    public, curator = split_record(record, cfg)
    assert curator is not None and public["clients"] is None  # the cohort size moved ...
    counts = {path: value for path, value in _numbers(public)
              if path.endswith(("_clients", "clients"))}
    assert not counts, (
        f"rounds.jsonl (a release) keeps {counts} under user-level DP: the secret cohort's "
        "size and make-up, which issue 26 moved to the curator's log")
    # ... to the curator's log, which keeps every figure; the release keeps the key.
    assert curator["expansion"]["target_clients"] == 1
    assert curator["expansion"]["source_clients"] == 2
    assert public["expansion"]["target_clients"] is None
    assert public["expansion"]["weighting"] == "fixed"


def test_every_plugin_is_covered_here():
    assert set(CONFIGS) == set(available_plugins())


@pytest.mark.parametrize("text", [t for texts in CONFIGS.values() for t in texts])
def test_a_user_level_release_of_plugin_extras_is_the_same_for_every_cohort(text):
    """Whatever the release keeps of a plugin's extras (values and which keys are there)
    is the same for cohorts of other sizes and members, empty and target-only ones
    included; everything else the curator keeps."""
    small = [_report(0, 1), _report(4, 2)]
    large = [_report(1, 3), _report(3, 5), _report(4, 7), _report(5, 11)]
    public_small, curator_small = _released(text, small)
    public_large, curator_large = _released(text, large)
    assert curator_small != curator_large  # the plugin did report cohort figures ...
    assert public_small == public_large  # ... and none of them reached the release
    for cohort in ([], [_report(0, 1)]):  # no client; a target client only
        assert _released(text, cohort)[0] == public_small


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_plugin_declares_a_cohort_figure_release_safe(name):
    """Declared release-safe keys are settings and fixed notes, never counts or weights
    of the cohort's members."""
    cls = plugin_class(name)
    for path in cls.release_safe:
        leaf = path.rsplit(".", 1)[-1]
        assert not any(word in leaf for word in ("clients", "examples", "weight_mean",
                                                  "flops", "rescored", "bytes")), path


def test_without_user_level_dp_the_extras_stay_in_the_log():
    text = LM_EXPANSION_USER_DP.replace("[privacy.user]\nenabled = true\n", "")
    public, curator = _released(text, [_report(0, 1), _report(4, 2)])
    assert curator is None
    assert public["expansion"]["source_clients"] == 1


def test_a_plugin_extra_outside_its_declared_keys_is_refused():
    class Leaky(Plugin):
        name = "leaky_test_plugin"
        extras_keys: ClassVar[frozenset[str]] = frozenset({"leaky"})

        def extras(self, rnd, clients):
            return {"cohort_size": len(clients)}

    plugin = Leaky({}, config_from_toml(EL2N_USER_DP))
    with pytest.raises(ValueError, match="cohort_size"):
        plugin.round_extras(1, [_report(0, 1)])


def test_a_release_safe_key_outside_the_extras_is_refused_at_registration():
    from strategies.plugins.base import register_plugin

    class Wrong(Plugin):
        name = "wrong_test_plugin"
        extras_keys: ClassVar[frozenset[str]] = frozenset({"wrong"})
        release_safe: ClassVar[frozenset[str]] = frozenset({"other.keep"})

    with pytest.raises(ValueError, match="other.keep"):
        register_plugin(Wrong)
    assert "wrong_test_plugin" not in available_plugins()


def test_moved_note_unchanged():
    assert "curator" in MOVED_NOTE


# ATTACK29C 3, 4: a third-party plugin's extras, nothing release-safe, so all the curator's.
declare_plugin_extras("attack29c_probe", ["attack29c_scores", "attack29c_note"], [])
USER_DP = ["data.num_clients=8", "train.clients_per_round=2", "privacy.user.enabled=true",
           "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=50"]


def _probe_released(extras: dict) -> dict:
    cfg = load_config(None, USER_DP)
    # The probe is this run's plugin (registered with the split only: a [[plugins]] table
    # naming it would fail the config's plugin-name check, which knows registered classes).
    cfg.plugins.append({"name": "attack29c_probe"})
    public, curator = split_record({"round": 3, "val_loss": 0.5, **extras}, cfg)
    assert curator is not None
    return public


def test_a_private_extra_keyed_by_client_keeps_no_client_key_in_the_release():
    """A private plugin extra keyed by partition id: the release holds the same whoever was
    in the secret cohort (no member's id, no cohort size in its keys)."""
    drawn = _probe_released({"attack29c_scores": {"3": 0.25, "7": 0.5}})
    other = _probe_released({"attack29c_scores": {"1": 0.75}})
    empty = _probe_released({"attack29c_scores": {}})
    assert "3" not in (drawn["attack29c_scores"] or {}), f"a member's id released: {drawn}"
    assert drawn == other == empty


def test_a_private_extra_present_only_for_some_cohorts_is_in_every_release():
    """A private plugin extra a plugin fills only when the cohort held someone: its key is
    in the release (null) either way, so presence does not say the secret cohort was empty."""
    filled = _probe_released({"attack29c_note": "rescored 2 clients"})
    absent = _probe_released({})
    assert filled == absent, f"key presence differs with the cohort: {filled} vs {absent}"
