"""Who `epsilon_user` protects, said once from the config. User-level DP clips and noises
each CLIENT's delta, so its epsilon protects one client's data: its unit is whatever the
partition makes a client (LMATTACK2 findings 2 and 3).

- `natural` (one client per `data.by` value): a user, all rows with one `data.by` value
  (rows without one grouped by label and collection, groups under 10 rows sharing one
  "other" client: a client holding several users protects each at least as well).
- any other scheme (`iid`, `dirichlet`): a client's shard, a random share of many users'
  rows; one person's rows sit in many shards, so the epsilon does not protect a person.

`check_user_unit` refuses the one config where a user would be several clients: natural
partitioning under user-level DP with a domain split (`data.domain_by`) by another column
than `data.by`. Each side of the split is partitioned on its own, so a user with rows on
both sides becomes two clients and is protected only as a group of two. Refused rather than
re-partitioned: moving a user's rows to one side would put source-domain rows in the target
population (or the reverse), which is not the experiment the config describes.
"""

from __future__ import annotations

from typing import Any

from fedtune.config.errors import ConfigError

# Partition schemes that give each `data.by` value its own client (fedtune.data.partition).
USER_PARTITIONS = ("natural",)


def user_unit(cfg: Any) -> str:
    """The unit of `cfg`'s epsilon_user, in one line (the note beside it, the docs' rule)."""
    data = cfg.data
    if data.partition in USER_PARTITIONS:
        return (f"unit: one user, every row with the same data.by={data.by!r} value, in one "
                f"client (data.partition={data.partition!r})")
    return (f"unit: one client's shard (data.partition={data.partition!r}), a random share of "
            "many users' rows, not a person: a user whose rows are in k shards is protected "
            "only as a group of k")


def check_user_unit(cfg: Any) -> None:
    """One line refusing a config where one user can be two clients under user-level DP."""
    data = cfg.data
    if not (cfg.privacy.user.enabled and data.partition in USER_PARTITIONS
            and data.domain_by and data.domain_by != data.by):
        return
    raise ConfigError(
        f"data.domain_by={data.domain_by!r} differs from data.by={data.by!r} with "
        f"privacy.user.enabled=true: a user with rows on both sides of the domain split "
        f"becomes two clients, and epsilon_user protects one; set data.domain_by="
        f"{data.by!r} (the target domain as data.by values) or turn privacy.user off")
