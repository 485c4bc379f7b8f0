"""Who a run folder is for. Under user-level DP the cohort is a secret Poisson draw, and the
epsilon_user promise holds only while nobody outside the curator (the server) learns who
was in it (issue 26's audit: a reader who knows a client was in 4 of 8 rounds holds it at
epsilon 11.93, not the 7.99 reported). So each round's cohort and per-client figures
(partition ids, node ids, norms, losses, counts, DP histories by client) go to
`curator_log.jsonl`, never into rounds.jsonl, unless `privacy.user.log_cohorts = true`.
So do the figures of the cohort as a whole (its size, sums over its members, their
unnoised mean loss): the release keeps each key with null, and summary.json's totals of
them are null too (`release_total`); the noised aggregate is all it says of the cohort.
`fedtune report` and exports read config.toml, rounds.jsonl and summary.json only.
Strategy plugins' round extras are the curator's too, path by path, unless the plugin
declared a path release-safe (`declare_plugin_extras`, called as a plugin registers:
strategies.plugins.base); the release keeps each moved path with null (a value with no
release-safe path under it, a dict keyed by partition ids say, goes whole), and every
declared key of the run's plugins is in every round, null where not filled. Split mode's sums
over the cohort (`fedtune.split.figures.COHORT_FIGURES`) are moved as the cohort
figures are, and their keys are null in every round of a split run, an empty cohort's too.
The per-client epsilons moved here carry the note their level's epsilon carries in the
release (`EPSILON_PARTS`, `fedtune.run.epsilon_marks.epsilon_note`).

Release (may be shared): config.toml, rounds.jsonl, summary.json, the final state, the
report. Curator's log (keep): curator_log.jsonl, the checkpoint, privacy_pending.json.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedtune.config import ExperimentConfig
from fedtune.run.atomic import append_line
from fedtune.run.folder import CURATOR_FILE
from fedtune.split.figures import COHORT_FIGURES as SPLIT_FIGURES

# Round-record keys that name the cohort or a client's own figures.
COHORT_KEYS = ("per_client", "rejected", "failed", "unsolicited", "refused_claims")
# Within the privacy sections: (section, key) that list clients by partition.
COHORT_PARTS = (("privacy_user", "aggregated_delta_norms"), ("privacy_sample", "histories"),
                ("privacy_sample", "epsilon_by_client"),
                ("privacy_sample", "interrupted_rounds_charged"))
# Of those, the ones holding epsilons by client -> their level: each moved one gets the
# level's note beside it (`<key>_note`), as each epsilon of the release has.
EPSILON_PARTS = {("privacy_sample", "epsilon_by_client"): "sample"}
# Round-record figures of the whole cohort: its size (`clients`, `sampled`), sums over its
# members (the bytes scale with the cohort size), their unnoised mean loss, whether any
# member's delta counted (`no_contribution`: true says the secret draw was empty) and the
# round's duration (an empty cohort's round took 0.7 s, a 3-client one 4.2 s). Moved with
# null left behind (the run-folder contract's "not applicable"), so readers keep the keys.
COHORT_FIGURES = ("clients", "sampled", "bytes_up", "bytes_down", "client_flops",
                  "train_loss", "no_contribution", "wall_s")
MOVED_NOTE = f"curator's log: {CURATOR_FILE} (privacy.user.log_cohorts = false)"
# Round-record keys a strategy plugin fills -> (plugin, the dotted paths under them a
# user-level release may keep). Filled by `declare_plugin_extras`; private by default.
_PLUGIN_EXTRAS: dict[str, tuple[str, frozenset[str]]] = {}


def declare_plugin_extras(plugin: str, keys: Iterable[str], release_safe: Iterable[str]
                          ) -> None:
    """Plugin `plugin` fills the round record's `keys`; of them a user-level release keeps
    only the `release_safe` dotted paths (a key claimed by two plugins is refused)."""
    safe = frozenset(release_safe)
    for key in keys:
        owner = _PLUGIN_EXTRAS.get(key, (plugin, safe))[0]
        if owner != plugin or key in COHORT_KEYS + COHORT_FIGURES + SPLIT_FIGURES:
            raise ValueError(f"round-record key {key!r} of plugin {plugin!r} is already "
                             f"{owner!r}'s or the round loop's")
    for key in keys:
        _PLUGIN_EXTRAS[key] = (plugin, safe)


def keeps_cohorts_apart(cfg: ExperimentConfig) -> bool:
    user = cfg.privacy.user
    return user.enabled and not user.log_cohorts


def split_record(record: dict[str, Any], cfg: ExperimentConfig
                 ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the round record for rounds.jsonl, the curator's entry or None). The release
    keeps every key, with each moved figure replaced by a pointer to the curator's log."""
    if not keeps_cohorts_apart(cfg):
        return record, None
    public = copy.deepcopy(record)
    curator: dict[str, Any] = {"round": record.get("round")}
    for key in COHORT_KEYS:
        if key in public:
            curator[key] = public[key]
            public[key] = MOVED_NOTE
    for key in COHORT_FIGURES:
        if key in public:
            curator[key], public[key] = public[key], None
    for key in SPLIT_FIGURES if cfg.split.enabled else ():
        if key in public:
            curator[key] = public[key]
        public[key] = None
    for section, key in COHORT_PARTS:
        part = public.get(section)
        if isinstance(part, dict) and key in part:
            curator.setdefault(section, {})[key] = part[key]
            part[key] = MOVED_NOTE
            if (level := EPSILON_PARTS.get((section, key))) is not None:
                curator[section][f"{key}_note"] = _by_client_note(
                    cfg, level, curator[section][key])
    active = {table.get("name") for table in cfg.plugins}
    for key, (plugin, safe) in _PLUGIN_EXTRAS.items():
        if key in public:
            _move_private(public, curator, key, key, safe)
        elif plugin in active:
            # Not filled this round: the key is still there (null), so whether a plugin
            # filled it never says who, or whether anyone, was in the secret cohort.
            public[key] = None
    return public, curator


def _by_client_note(cfg: ExperimentConfig, level: str, by_client: Any) -> str | None:
    """The note beside epsilons by client of `level` (the largest one's; the same text
    for each): null when there is none."""
    # Imported here: the marks read fedtune.privacy, whose package loads torch, and the
    # CLI imports this module before a run starts (tests/test_config_imports.py).
    from fedtune.run.epsilon_marks import epsilon_note

    values = [v for v in by_client.values() if isinstance(v, (int, float))] \
        if isinstance(by_client, dict) else []
    return epsilon_note(cfg, level, max(values, default=None))


def _move_private(public: dict[str, Any], curator: dict[str, Any], key: str, path: str,
                  safe: frozenset[str]) -> None:
    """Move `public[key]` (at dotted `path`) to `curator[key]` but for its release-safe
    paths, leaving null where a value was. A value with no release-safe path under it goes
    whole (its own keys can be partition ids); a dict holding one keeps its keys, each
    release-safe child there (null when not filled) whatever the cohort."""
    if path in safe:
        return
    value = public[key]
    below = {p[len(path) + 1:].split(".")[0] for p in safe if p.startswith(f"{path}.")}
    if not (below and isinstance(value, dict)):
        curator[key], public[key] = value, None
        return
    for sub in below - set(value):
        value[sub] = None
    moved: dict[str, Any] = {}
    for sub in list(value):
        _move_private(value, moved, sub, f"{path}.{sub}", safe)
    if moved:
        curator[key] = moved


def release_total(history: list[dict[str, Any]], key: str) -> float | int | None:
    """summary.json's total of a round figure: null when any round's release holds none
    (a cohort figure kept for the curator's log)."""
    values = [r.get(key) for r in history]
    if any(v is None for v in values):
        return None
    return sum(values)  # type: ignore[arg-type]


def curator_view(history: list[dict[str, Any]], out_dir: str | Path) -> list[dict[str, Any]]:
    """The rounds as the curator saw them: each released record with the figures its
    curator's-log entry holds put back (the release itself where there is none)."""
    entries = {e.get("round"): e for e in read_curator(out_dir)}
    return [{**r, **entries.get(r.get("round"), {})} for r in history]


def append_curator(out_dir: str | Path, entry: dict[str, Any]) -> None:
    """One line of the curator's log, flushed to disk."""
    path = Path(out_dir) / CURATOR_FILE
    append_line(path, json.dumps(entry), mode=0o600)


def read_curator(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / CURATOR_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
