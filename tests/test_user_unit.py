"""Who epsilon_user protects: one client's data, so the unit a run's partition makes. Under
user-level DP a user (`data.by`, natural partitioning) is never two clients (LMATTACK2 2),
and the note beside epsilon_user names the unit the partition really makes, a user or a
client's random shard (LMATTACK2 3)."""

from __future__ import annotations

import pytest

from fedtune.config import ConfigError
from fedtune.config.load import config_from_toml

EXPANDED_LM_USER_DP = """
[task]
kind = "causal_lm"
[data]
partition = "natural"
by = "mailing_list"
domain_by = "collection"
target_domain = "set2"
target_clients = 1
num_clients = 3
validation_fraction = 0.0
[train]
clients_per_round = 2
[privacy.sample]
enabled = false
[privacy.user]
enabled = true
[[plugins]]
name = "population_expansion"
weighting = "fixed"
"""


def _rows():
    """Two lists; "fork" has 12 messages in each collection (as SpamAssassin's lists have
    messages in both set1 and set2), "ilug" 12 in set1 only."""
    import datasets

    lists = ["fork"] * 24 + ["ilug"] * 12
    collections = ["set2"] * 12 + ["set1"] * 12 + ["set1"] * 12
    return datasets.Dataset.from_dict({
        "id": [str(i) for i in range(len(lists))],
        "text": [f"message {i} of {name}" for i, name in enumerate(lists)],
        "label": [0] * len(lists), "mailing_list": lists, "collection": collections})


def test_one_user_is_never_two_clients_under_user_level_dp():
    """Invariant: under privacy.user (a user, data.by, is epsilon_user's unit) no data.by
    value's rows are split over two clients, or the config is refused in one line."""
    from fedtune.data.domains import partition_domains

    try:
        cfg = config_from_toml(EXPANDED_LM_USER_DP)
    except ConfigError:
        return  # refusing domain_by != by under user-level DP holds the invariant
    ds = _rows()
    parts = partition_domains(ds, cfg.data, seed=0)
    owners: dict[str, list[int]] = {}
    for client, rows in enumerate(parts):
        for name in sorted({ds[int(i)]["mailing_list"] for i in rows}):
            owners.setdefault(name, []).append(client)
    split = {name: clients for name, clients in owners.items() if len(clients) > 1}
    assert not split, (
        f"user(s) {split} are each several clients (one per side of data.domain_by="
        f"{cfg.data.domain_by!r}): epsilon_user protects one client, so such a user's "
        "data is covered only at about len(clients) x the epsilon shown")


def test_the_refusal_is_one_line_naming_the_keys_and_the_fix():
    with pytest.raises(ConfigError) as err:
        config_from_toml(EXPANDED_LM_USER_DP)
    text = str(err.value)
    assert "\n" not in text
    for key in ("data.domain_by", "data.by", "privacy.user"):
        assert key in text, text


@pytest.mark.parametrize("change", [
    ('domain_by = "collection"\ntarget_domain = "set2"',  # the domain column is the user's
     'domain_by = "mailing_list"\ntarget_domain = "fork"'),
    ("[privacy.user]\nenabled = true\n", ""),  # no user-level epsilon
    ('partition = "natural"', 'partition = "iid"'),  # a client is a shard, not a user
])
def test_a_domain_split_that_keeps_users_whole_or_claims_none_is_accepted(change):
    cfg = config_from_toml(EXPANDED_LM_USER_DP.replace(*change))
    assert cfg.data.domain_by


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_an_lm_epsilon_user_over_shards_does_not_claim_a_user(partition):
    """Invariant: a causal LM's epsilon_user is not shown as a user's when its clients are
    random shards of every user's texts (data.partition='iid'): refused, or its note says
    the unit is the shard."""
    from fedtune.run.epsilon_marks import epsilon_note

    text = (EXPANDED_LM_USER_DP.replace('partition = "natural"', f'partition = "{partition}"')
            .replace('domain_by = "collection"\ntarget_domain = "set2"\ntarget_clients = 1\n',
                     "").replace('[[plugins]]\nname = "population_expansion"\n'
                                 'weighting = "fixed"\n', ""))
    if partition == "dirichlet":  # a causal LM's rows have no label to skew
        with pytest.raises(ConfigError):
            config_from_toml(text)
        text = text.replace('[task]\nkind = "causal_lm"\n', "")
    try:
        cfg = config_from_toml(text)
    except ConfigError:
        return
    note = epsilon_note(cfg, "user", 8.0) or ""
    assert partition in note or "shard" in note, (
        f"task.kind={cfg.task.kind!r}, data.partition={partition!r}, privacy.user on: "
        f"accepted, and epsilon_user's note ({note!r}) does not say its unit is a random "
        "shard of all users' texts, while the docs call the unit 'a mailing list, a user'")
    assert "not a person" in note and "mailing_list" not in note


@pytest.mark.parametrize("kind", ["causal_lm", "classification"])
def test_a_natural_partition_names_the_user_column(kind):
    from fedtune.run.epsilon_marks import epsilon_note

    text = EXPANDED_LM_USER_DP.replace(
        'domain_by = "collection"\ntarget_domain = "set2"\ntarget_clients = 1\n', "").replace(
        '[[plugins]]\nname = "population_expansion"\nweighting = "fixed"\n', "")
    text = text.replace('kind = "causal_lm"', f'kind = "{kind}"')
    cfg = config_from_toml(text)
    note = epsilon_note(cfg, "user", 8.0) or ""
    assert "data.by='mailing_list'" in note, note
    assert epsilon_note(cfg, "sample", 8.0) and "data.by" not in epsilon_note(cfg, "sample", 8.0)
    assert epsilon_note(cfg, "user", None) is None
