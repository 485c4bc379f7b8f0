"""Choosing a sweep's settings on the validation split, never on the test split.

Variants that differ only in `seed` are one candidate, scored by the mean over its seeds.
Candidates rank by the validation accuracy of their final models (`final_val_accuracy`):
a run releases its final model, not its best round, so that is the model a setting is
chosen for. Test accuracy rides along to be reported, and never moves the ranking.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.study.sweep import Variant

SELECT_BY = "final_val_accuracy"


@dataclass(frozen=True)
class Candidate:
    # The overrides that tell this candidate apart from the others (seed left out).
    settings: tuple[str, ...]
    runs: tuple[str, ...]
    val_accuracy: float  # mean final_val_accuracy over the runs: what ranks
    test_accuracy: float  # mean final_accuracy over the runs: reported only

    @property
    def label(self) -> str:
        return " ".join(self.settings) or "(the base config)"


def rank_by_validation(variants: Sequence[Variant], rows: Sequence[dict[str, Any]]
                       ) -> list[Candidate]:
    """Candidates, best mean validation accuracy first (ties keep the sweep's order).
    A candidate with a run that has no validation split (data.validation_fraction = 0) is
    left out: there is nothing to choose it on."""
    by_name = {row["name"]: row for row in rows}
    settings = {v.name: _effective(v.overrides) for v in variants}
    shared = set.intersection(*(set(s.items()) for s in settings.values())) if settings \
        else set()
    groups: dict[tuple[str, ...], list[str]] = {}
    for variant in variants:
        own = tuple(f"{k}={v}" for k, v in settings[variant.name].items()
                    if k != "seed" and (k, v) not in shared)
        groups.setdefault(own, []).append(variant.name)
    candidates = []
    for own, names in groups.items():
        scores = [by_name[n].get(SELECT_BY) for n in names]
        if any(s is None for s in scores):
            continue
        candidates.append(Candidate(own, tuple(names), statistics.fmean(scores),
                                    statistics.fmean(by_name[n]["final_accuracy"]
                                                     for n in names)))
    return sorted(candidates, key=lambda c: -c.val_accuracy)


def _effective(overrides: Sequence[str]) -> dict[str, str]:
    """key -> value text of `key=value` overrides; a later one for the same key wins, as
    when they are applied."""
    out: dict[str, str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out
