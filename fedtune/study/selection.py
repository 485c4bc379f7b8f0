"""Choosing a sweep's settings on the validation split, never on the test split.

Variants that differ only in `seed` are one candidate, scored by the mean over its seeds.
Candidates rank by the validation figure of their final models, the task kind's
(`fedtune.study.report.QUALITY_AXES`): a classifier's `final_val_accuracy` (highest
first), a language model's `final_val_perplexity` (lowest first). A run releases its final
model, not its best round, so that is the model a setting is chosen for. The test figure
(`final_accuracy`, `test_perplexity`) rides along to be reported, and never moves the
ranking.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.study.report import QUALITY_AXES, QualityAxis
from fedtune.study.sweep import Variant


@dataclass(frozen=True)
class Candidate:
    # The overrides that tell this candidate apart from the others (seed left out).
    settings: tuple[str, ...]
    runs: tuple[str, ...]
    val_score: float  # mean final validation figure over the runs: what ranks
    test_score: float | None  # mean final test figure over the runs: reported only

    @property
    def label(self) -> str:
        return " ".join(self.settings) or "(the base config)"


def selection_axis(variants: Sequence[Variant]) -> QualityAxis:
    """The quality figure the variants are chosen on: their task kind's (a sweep holds one
    kind: `load_sweep` refuses a mix)."""
    kinds = {v.task_kind for v in variants} or {"classification"}
    if len(kinds) > 1:
        raise ValueError(f"a sweep's runs share one task kind, these have {sorted(kinds)}")
    return QUALITY_AXES[kinds.pop()]


def rank_by_validation(variants: Sequence[Variant], rows: Sequence[dict[str, Any]]
                       ) -> list[Candidate]:
    """Candidates, best mean validation figure first (ties keep the sweep's order). A
    candidate with a run that has no validation figure (data.validation_fraction = 0, or a
    language model that diverged: its perplexity is null) is left out: there is nothing to
    choose it on."""
    axis = selection_axis(variants)
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
        scores = [by_name[n].get(axis.final_val_key) for n in names]
        if any(s is None for s in scores):
            continue
        tests = [by_name[n].get(axis.final_key) for n in names]
        candidates.append(Candidate(
            own, tuple(names), statistics.fmean(scores),
            None if any(t is None for t in tests) else statistics.fmean(tests)))
    sign = 1 if axis.lower_is_better else -1
    return sorted(candidates, key=lambda c: sign * c.val_score)


def _effective(overrides: Sequence[str]) -> dict[str, str]:
    """key -> value text of `key=value` overrides; a later one for the same key wins, as
    when they are applied."""
    out: dict[str, str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out
