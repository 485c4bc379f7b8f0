"""Robust aggregation: pure functions on a stack of client deltas, chosen by name.

`aggregate(deltas, weights, cfg, ids)` runs one round's aggregation step: the optional norm
bound first (each delta scaled down to a fixed bound, or to `adaptive_factor` x the median
norm of the cohort; with `norm_bound_center = "median"` each delta's distance from the
cohort's coordinate-wise median instead: `centred_clip`; "auto" is resolved from the
server's privacy setting beforehand, `AggregationConfig.for_sample_dp`, as is an "auto"
direction check), then with `norm_bound_direction = "median"` the direction check
(`direction_check`: the bounded rows whose cosine to the coordinate-wise median of the
other rows is below `direction_min_cosine` are dropped, at most `tolerate` of them), then
the rule `cfg.rule` from `RULES`. With `norm_bound_direction = "validation"` the check's
reference is instead one direction for every row, the server's own descent direction on its
validation rows (`fedtune.task.reference`, passed in as `reference`), and the check also
runs before `median`, with or without a bound; with `direction_weighting = "cosine"`
(after a bound, before `mean`) no row is dropped: each row's weight is scaled by
max(0, its cosine to that reference), FLTrust's trust score, and each row's share of the
round is capped at 1 / (cohort - tolerate) for the configured cohort
(`strategies.trust_weighting`, where its bound is stated: one row moves the model by at most
B / (cohort - tolerate)); with `direction_weighting = "zero"` (before `median`, with or
without a bound) no row is dropped either: the rows below the threshold, the lowest first
and at most a minority of the round, become zero votes and the median runs over every
row (`strategies.zero_vote`, where its bound is stated). It returns the aggregated delta
(float64) and the figures the round record keeps (`Aggregated`).

What each rule bounds (threat class 5 in THREATS.md), n deltas in the cohort:

- `mean`: nothing on its own; with a norm bound B and equal weights one client moves the
  aggregate by at most B / n (by B x its share of the weights in general).
- `mean` with the norm bound and the direction check: the union of the two. The bound's:
  every kept row, so the aggregate, has norm <= B, and one client's row counts with at most
  its weight over the kept weights, B / (n - f) with equal weights (the check drops at most
  f = `tolerate` rows). The check's, with n >= 2f + 2 (refused below): every row is
  checked against the median of the n - 1 other rows, an honest majority, so every
  reference lies inside the honest rows' range on every coordinate (at n = 2f + 1 the
  attackers are half of an honest row's others and can turn its reference against it:
  review ATTACK27D); the rows below `direction_min_cosine` (0: a component against their
  reference) are dropped, the lowest first, so a reversed honest step that scores lowest is
  dropped instead of cancelling an honest client's. What it does not bound: a row at the
  threshold (orthogonal to the reference, or just above it) is kept and moves the aggregate
  sideways by up to B x its share; f attackers can shift the reference within the honest
  range and so have up to f honest rows dropped in their place; a targeted change that
  keeps a positive cosine passes. The norm bound holds in every such case.
- the check against the server's validation direction (`norm_bound_direction =
  "validation"`, FLTrust's trusted root-set direction, Cao et al. 2021), before `mean` with
  a norm bound or before `median`: every row whose cosine to the negative validation
  gradient at the global model is below `direction_min_cosine` is dropped, at most
  `tolerate`, the lowest first. No client moves that reference, so a reversed row scores
  against it whatever the other rows send and whatever the cohort's size (the others'
  median needs n >= 2f + 2 for that); before `median` the cohort must be n >= 3f + 1, as the
  check may drop f honest rows and keep f attackers that point the validation way, and the
  median of the n - f rows left needs an honest majority (n >= 2f + 1 with the majority
  limit, which leaves 2f + 1 rows); before `mean`, n > f. With `mean` the bound's
  guarantee holds as above. What it does not bound: a row with a positive cosine (a
  boosted honest step, hence the bound with `mean`; a targeted change orthogonal to the
  server's direction) is kept; an honest non-IID client whose step points away from the
  validation rows is dropped (at most `tolerate` a round, or with `direction_drop_limit =
  "majority"` before `median` every row below the threshold while 2f + 1 rows are left: up
  to n - 2f - 1 honest rows, the median's bound kept; it does not guarantee that a reversed
  row scoring above honest ones is dropped). Trust and privacy: it trusts the
  server's validation rows (the root set) and reads nothing else; no DP mechanism covers
  those rows, and the released model depends on them through which rows are kept. The
  epsilons cover the clients' training data only, which the check does not change: under
  DP-SGD each delta is already private, and selecting among them with the server's own
  rows is post-processing. Under user-level DP no robust rule or check runs (the config
  refuses them: the DP clip is the bound and the epsilon holds for the clipped mean).
- `median` (coordinate-wise, Flower's FedMedian): fewer than half of the clients cannot
  move any coordinate outside the honest clients' range, whatever they send.
- `trimmed_mean` (coordinate-wise, as Flower's FedTrimmedAvg `trim_mean`): the
  max(f, floor(beta x n)) largest and smallest values of each coordinate are dropped, so up
  to that many attackers are cut per coordinate.
- `krum` / `multi_krum` (Flower's Krum / MultiKrum `select_multikrum`): the m deltas with
  the smallest summed squared distance to their n - f - 2 nearest neighbours are averaged;
  an outlier is far from everyone and is not selected.

Each rule holds its bound only with enough deltas for its f attackers (`cfg.tolerate`; Krum's
`krum_f`): median and the adaptive bound need n >= 2f + 1, the direction check n >= 2f + 2,
trimmed_mean n > 2 x its cut,
Krum n >= 2f + 3 (and Multi-Krum m <= n - f). The configured cohort is checked at load, but
clients drop, so `aggregate` checks the deltas it has (`AggregationConfig.shortfall`) and
with too few refuses the round's update (delta None, the reason in the figures) rather than
run a rule whose bound no longer holds.

The coordinate-wise rules and Krum's selection count each client once (as Flower's do):
the weights only drop clients weighted 0 and weight the mean of `mean` and of Multi-Krum's
selection. A weight is a lever too, so the rules that bound influence do not use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.config import AggregationConfig
from strategies.trust_weighting import COSINE, ZERO_TRUST, four_significant, trust_weighted
from strategies.zero_vote import ZERO, zero_votes


@dataclass
class Aggregated:
    """One round's aggregated delta and what the round record says about how."""

    # None: the update is refused (too few deltas for the rule; figures["refused"] says why).
    delta: np.ndarray | None
    figures: dict[str, Any] = field(default_factory=dict)


# A rule: (deltas (n, d) float64, weights (n,) > 0, settings, ids) -> aggregated delta and
# the rule's own figures.
Rule = Callable[[np.ndarray, np.ndarray, AggregationConfig, list[Any]],
                tuple[np.ndarray, dict[str, Any]]]
RULES: dict[str, Rule] = {}


def register(name: str) -> Callable[[Rule], Rule]:
    def add(rule: Rule) -> Rule:
        if name in RULES:
            raise ValueError(f"aggregation rule {name!r} is registered twice")
        RULES[name] = rule
        return rule
    return add


@register("mean")
def weighted_mean(deltas: np.ndarray, weights: np.ndarray, cfg: AggregationConfig,
                  ids: list[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """FedAvg: the weighted mean delta."""
    return (deltas * (weights / weights.sum())[:, None]).sum(0), {}


@register("median")
def coordinate_median(deltas: np.ndarray, weights: np.ndarray, cfg: AggregationConfig,
                      ids: list[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Coordinate-wise median, as Flower's FedMedian computes it (`np.median`)."""
    return np.median(deltas, axis=0), {}


@register("trimmed_mean")
def coordinate_trimmed_mean(deltas: np.ndarray, weights: np.ndarray, cfg: AggregationConfig,
                            ids: list[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Coordinate-wise trimmed mean, as Flower's `trim_mean` (FedTrimmedAvg's own function)
    computes it, cutting `cfg.trimmed_per_side(n)` per side: at least the tolerated f."""
    cut = cfg.trimmed_per_side(len(deltas))
    kept = np.sort(deltas, axis=0)[cut:len(deltas) - cut]
    return kept.mean(axis=0), {"trim_beta": cfg.trim_beta, "trimmed_per_side": cut}


@register("krum")
def krum(deltas: np.ndarray, weights: np.ndarray, cfg: AggregationConfig,
         ids: list[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Krum: the one delta closest to its n - f - 2 nearest neighbours."""
    return _multi_krum(deltas, weights, cfg.krum_f, 1, ids)


@register("multi_krum")
def multi_krum(deltas: np.ndarray, weights: np.ndarray, cfg: AggregationConfig,
               ids: list[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Multi-Krum: the weighted mean of the m best-scored deltas (m = 0: n - f)."""
    # `aggregate` has checked 1 <= m <= n - f (`AggregationConfig.shortfall`).
    m = cfg.multi_krum_m or len(deltas) - cfg.krum_f
    return _multi_krum(deltas, weights, cfg.krum_f, m, ids)


def krum_scores(deltas: np.ndarray, f: int) -> np.ndarray:
    """Each delta's sum of squared distances to its n - f - 2 nearest others (at least
    one), Flower's `select_multikrum` score. Distances are taken as ||x - y||^2 directly:
    Flower's ||x||^2 + ||y||^2 - 2xy cancels to noise next to a delta of norm 1e9."""
    n = len(deltas)
    dist = np.empty((n, n))
    for i in range(n):
        diff = deltas - deltas[i]
        dist[i] = np.einsum("ij,ij->i", diff, diff)
    closest = max(1, n - f - 2)
    # Column 0 of each sorted row is the delta itself (distance 0), as in Flower.
    return np.sort(dist, axis=1)[:, 1:closest + 1].sum(1)


def _multi_krum(deltas: np.ndarray, weights: np.ndarray, f: int, m: int,
                ids: list[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    scores = krum_scores(deltas, f)
    chosen = np.argsort(scores, kind="stable")[:m]
    delta, _ = weighted_mean(deltas[chosen], weights[chosen], AggregationConfig(), [])
    return delta, {"krum_f": f, "selected": [ids[i] for i in sorted(chosen)]}


# -- norm bound


def resolve_bound(cfg: AggregationConfig, norms: np.ndarray) -> float | None:
    """The round's norm bound: None (off), the configured number, or `adaptive_factor` x
    the cohort's median norm (honest when fewer than half of the cohort attack)."""
    if cfg.norm_bound == "off":
        return None
    if cfg.norm_bound == "adaptive":
        return float(cfg.adaptive_factor * np.median(norms))
    return float(cfg.norm_bound)


def clip_rows(deltas: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Each row scaled down to L2 norm at most `bound`; the rows clipped (a mask). Rounding
    cannot lift a clipped row over the bound: its scale is rounded down."""
    norms = np.linalg.norm(deltas, axis=1)
    over = norms > bound
    scale = np.ones_like(norms)
    scale[over] = np.nextafter(bound / norms[over], 0.0)
    return deltas * scale[:, None], over


def centred_clip(deltas: np.ndarray, cfg: AggregationConfig
                 ) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Centred clipping (Karimireddy et al. 2021, one step), then the bound around zero:
    each delta's difference from the cohort's coordinate-wise median scaled down to the
    bound (a number, or `adaptive_factor` x the median distance) and added back to the
    median; then each row scaled down to the bound around zero (the same number, or
    `_largest_honest_norm`). The rows, the centred bound, the rows clipped by either, and
    the bound around zero.

    What it bounds: every row has norm <= the bound around zero, so the aggregate does and
    one client moves the mean by at most 2 x bound / n: a numeric bound however many attack,
    the adaptive one while at most `tolerate` do (it is then an honest client's norm).
    With f < n / 2 attackers the median stays inside the honest clients' range on every
    coordinate (as the `median` rule) and every row ends within the centred bound of it,
    so a client that sends the honest step reversed is pulled back to the honest spread
    instead of cancelling an honest client's step. The centre is not an
    honest point: f coordinated attackers can shift it within the honest spread on every
    coordinate (as they can the median rule's result), which a small bound cannot undo."""
    center = np.median(deltas, axis=0)
    bound = resolve_bound(cfg, np.linalg.norm(deltas - center, axis=1))
    assert bound is not None  # validate(): a centre needs a bound
    zero_bound = bound if cfg.norm_bound != "adaptive" else _largest_honest_norm(deltas, cfg)
    moved, over = clip_rows(deltas - center, bound)
    rows, over_zero = clip_rows(center + moved, zero_bound)
    return rows, bound, over | over_zero, zero_bound


def _largest_honest_norm(deltas: np.ndarray, cfg: AggregationConfig) -> float:
    """`adaptive_factor` x the (n - tolerate)-th smallest norm: with at most `tolerate`
    attackers an honest client's norm, and no honest row above it but the largest ones, so
    the bound around zero caps an attacker without shortening the honest rows (the median
    norm would shorten half of them, which centring has already pulled in)."""
    norms = np.sort(np.linalg.norm(deltas, axis=1))
    return float(cfg.adaptive_factor * norms[len(norms) - 1 - cfg.tolerate])


def direction_check(deltas: np.ndarray, cfg: AggregationConfig, ids: Sequence[Any],
                    reference: np.ndarray | None = None
                    ) -> tuple[np.ndarray, dict[str, Any]]:
    """Which bounded rows the mean keeps (a mask), and the figures: each row's cosine to
    its reference, the coordinate-wise median of the other rows (`median_of_others`), and
    the rows dropped: those below `cfg.direction_min_cosine`, the lowest first, at most
    `cfg.tolerate` of them.

    Why the others' median: the median of the whole cohort moves towards a reversed row at
    an honest norm (its value is a middle one on many coordinates), enough to turn its
    cosine positive when the honest rows share little (non-IID clients without DP noise);
    an attacker's own reference holds f - 1 attackers among n - 1 rows and lies inside
    the honest rows' range on every coordinate. Why at most `tolerate`: with at most f
    attackers a further row below the threshold is an honest one (a non-IID client, or
    one whose reference the attackers shifted), and dropping it would raise the kept rows'
    share of the mean; capped, one row's share stays <= its weight over all but the f
    largest weights. A zero row has cosine 0; a row whose reference is zero (no
    direction) is never dropped.

    `reference` (`norm_bound_direction = "validation"`): one direction every row is checked
    against instead, the server's own (`ServerReference`), which no client moves within the
    round (the rows kept move the global model, so the next round's reference: a slow
    drift that keeps a positive cosine passes).
    The cap at `tolerate` is kept with it: with a trusted reference a row below the
    threshold is not an attacker's doing on the reference, but an honest non-IID client
    can still point away from the server's validation rows, and the cap keeps the kept
    rows' share bounded as above. Before `median`, `direction_drop_limit = "majority"`
    lifts the cap to all but 2 x tolerate + 1 rows (`AggregationConfig.drop_limit`): the
    median of the rows left holds an honest majority whichever rows were dropped. It drops
    more rows below the threshold than the cap, not every one: a reversed row that scores
    above the honest rows dropped may stay (its median's bound holds; review ATTACK31)."""
    cosines, no_reference = reference_cosines(deltas, reference)
    _, dropped = lowest_below(cosines, no_reference, cfg.direction_min_cosine,
                              cfg.drop_limit(len(deltas)))
    keep = ~dropped
    named = _cosine_figures(cosines, no_reference, ids, reference)
    # The record's key order of before the weighting existed (records are compared as text).
    figures = {"reference": named["reference"], "min_cosine": cfg.direction_min_cosine,
               "dropped": [i for i, k in zip(ids, keep, strict=True) if not k],
               **{k: v for k, v in named.items() if k != "reference"}}
    return keep, figures


def lowest_below(cosines: np.ndarray, no_reference: np.ndarray, threshold: float,
                 limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows below `threshold` (a row with no reference, a zero direction, never is:
    nothing speaks against it) and of them the lowest `limit`, ties in row order (masks):
    the rows the direction check drops or the zero vote zeroes."""
    below = (cosines < threshold) & ~no_reference
    order = np.flatnonzero(below)
    chosen = np.zeros(len(cosines), dtype=bool)
    chosen[order[np.argsort(cosines[order], kind="stable")][:limit]] = True
    return below, chosen


def reference_cosines(deltas: np.ndarray, reference: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's cosine to its reference (the median of the other rows, or the one
    `reference` given) and which rows have no reference direction (cosine 0): a zero one,
    or a non-finite one. The server's gradient at a global vector the clients moved (a
    diverged model) can overflow; that round has no direction, never an error."""
    cosines = np.zeros(len(deltas))
    no_reference = np.zeros(len(deltas), dtype=bool)
    if reference is not None and not _finite(reference):
        reference = np.zeros(np.shape(reference))
    references = (median_of_others(deltas) if reference is None
                  else np.broadcast_to(np.asarray(reference, dtype=np.float64), deltas.shape))
    for i, (row, ref) in enumerate(zip(deltas, references, strict=True)):
        ref_unit, ref_norm = _unit(ref)
        no_reference[i] = ref_norm == 0.0
        cosines[i] = float(np.clip(_unit(row)[0] @ ref_unit, -1.0, 1.0))
    return cosines, no_reference


def _cosine_figures(cosines: np.ndarray, no_reference: np.ndarray, ids: Sequence[Any],
                    reference: np.ndarray | None) -> dict[str, Any]:
    name = "median of the others" if reference is None else VALIDATION_REFERENCE
    unusable = {} if reference is None or _finite(reference) else {"reference_finite": False}
    return {"reference": name,
            "cosines": [[i, four_significant(c)] for i, c in zip(ids, cosines, strict=True)],
            "no_reference": [i for i, z in zip(ids, no_reference, strict=True) if z],
            **unusable}


def cosine_weighting(deltas: np.ndarray, weights: np.ndarray, ids: Sequence[Any],
                     reference: np.ndarray, cohort: int, tolerate: int
                     ) -> tuple[np.ndarray, dict[str, Any]]:
    """`direction_weighting = "cosine"`: the rows' capped shares of the round, from their
    weights and their trust in the server's direction (strategies.trust_weighting), and the
    figures: each row's cosine, trust and share."""
    cosines, no_reference = reference_cosines(deltas, reference)
    shares, figures = trust_weighted(weights, cosines, no_reference, ids, cohort, tolerate)
    return shares, {**_cosine_figures(cosines, no_reference, ids, reference), **figures}


EVERY_ROW_DROPPED = "the direction check dropped every row: no update this round"
# The figures' name of the server's reference (`norm_bound_direction = "validation"`).
VALIDATION_REFERENCE = "server validation gradient"


def median_of_others(deltas: np.ndarray) -> np.ndarray:
    """Row i: the coordinate-wise median of every row but i (as `np.median` of them), from
    one sort of each coordinate: O(n d log n), not n medians. Without row i the sorted
    column is the full one less the entry at i's rank, so the others' k-th value is the
    full column's k-th below that rank and its (k + 1)-th from it on."""
    n = len(deltas)
    order = np.argsort(deltas, axis=0, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n)[:, None], axis=0)
    ordered = np.take_along_axis(deltas, order, axis=0)

    def others_at(k: int) -> np.ndarray:
        return np.take_along_axis(ordered, np.where(k < ranks, k, k + 1), axis=0)

    m = n - 1
    if m % 2:
        return others_at(m // 2)
    return (others_at(m // 2 - 1) + others_at(m // 2)) / 2


def _finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all())


def _unit(row: np.ndarray) -> tuple[np.ndarray, float]:
    """The row's direction (zeros for a zero row) and its norm. Scaled by its largest
    entry first, so that a row near float64's limit does not overflow its own norm."""
    top = float(np.max(np.abs(row))) if row.size else 0.0
    if top == 0.0:
        return np.zeros_like(row), 0.0
    scaled = row / top
    norm = float(np.linalg.norm(scaled))
    return scaled / norm, norm * top


def _direction_figures(figures: dict[str, Any], bound: float | None,
                       checked: dict[str, Any]) -> None:
    """Where a bound runs, the check's figures stay under it (as before the check could
    run without one); otherwise they are the round's own `direction`."""
    if bound is not None:
        figures["norm_bound"]["direction"] = checked
    else:
        figures["direction"] = checked


def aggregate(deltas: np.ndarray, weights: Sequence[float], cfg: AggregationConfig,
              ids: Sequence[Any] | None = None, reference: np.ndarray | None = None,
              cohort: int = 0) -> Aggregated | None:
    """Norm bound (if any), the direction check (if any), then `cfg.rule`, over the deltas
    with a positive weight; None when no delta has one; a refused update (delta None) when
    they are too few for the rule and bound to tolerate `cfg.tolerate` attackers. `ids` name
    the rows in the figures. `reference`: the server's validation direction, in the
    deltas' layout, which `norm_bound_direction = "validation"` needs (and nothing else
    reads)."""
    for key in ("norm_bound_center", "norm_bound_direction"):
        if getattr(cfg, key) == "auto":
            # It follows the server's privacy setting, which this function does not see.
            raise ValueError(f"aggregation.{key}='auto' must be resolved by "
                             "AggregationConfig.for_sample_dp before aggregating")
    if cfg.direction_weighting == COSINE and (cfg.norm_bound_direction != "validation"
                                              or cfg.rule != "mean" or cfg.norm_bound == "off"):
        # AggregationConfig.validate refuses it; a settings object built around it is a bug.
        raise ValueError("aggregation.direction_weighting='cosine' needs aggregation."
                         "norm_bound_direction='validation', rule='mean' and a norm bound")
    if cfg.direction_weighting == ZERO and (cfg.norm_bound_direction != "validation"
                                            or cfg.rule != "median"):
        raise ValueError("aggregation.direction_weighting='zero' needs aggregation."
                         "norm_bound_direction='validation' and rule='median'")
    if cfg.norm_bound_direction == "validation":
        if reference is None:
            raise ValueError("aggregation.norm_bound_direction='validation' needs the "
                             "server's reference direction (ServerReference)")
        reference = np.asarray(reference, dtype=np.float64)
        if reference.shape != (np.shape(deltas)[1],):
            # The server's own computation, never a client's: a bug, not an input.
            raise ValueError(f"the validation reference has shape {reference.shape}; the "
                             f"deltas have {np.shape(deltas)[1]} values")
        # Its values may be non-finite (reference_cosines): not a bug.
    else:
        reference = None
    deltas = np.asarray(deltas, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    names = list(range(len(deltas))) if ids is None else list(ids)
    keep = w > 0
    if not keep.any():
        return None
    deltas, w = deltas[keep], w[keep]
    names = [n for n, k in zip(names, keep, strict=True) if k]
    figures: dict[str, Any] = {"rule": cfg.rule, "deltas": len(deltas)}
    refused = cfg.shortfall(len(deltas), "deltas this round")
    if refused is not None:
        return Aggregated(None, {**figures, "refused": refused})
    zero_bound = None
    if cfg.norm_bound_center == "median":
        deltas, bound, clipped, zero_bound = centred_clip(deltas, cfg)
    else:
        bound = resolve_bound(cfg, np.linalg.norm(deltas, axis=1))
        if bound is not None:
            deltas, clipped = clip_rows(deltas, bound)
    if bound is not None:
        figures["norm_bound"] = {"setting": cfg.norm_bound, "bound": bound,
                                 "clipped": [n for n, c in zip(names, clipped, strict=True)
                                             if c]}
        if cfg.norm_bound_center != "zero":
            figures["norm_bound"].update(center=cfg.norm_bound_center, bound_zero=zero_bound)
    if cfg.direction_weighting == COSINE:
        # After the bound (every row bounded), in place of `mean`: every row stays, with its
        # capped share; the shares sum to 1 or less, so they are not renormalized (that
        # would undo the cap).
        shares, weighted = cosine_weighting(deltas, w, names, reference, cohort, cfg.tolerate)
        figures["norm_bound"]["direction"] = weighted
        if not shares.sum() > 0:
            return Aggregated(None, {**figures, "refused": ZERO_TRUST})
        return Aggregated((deltas * shares[:, None]).sum(0), figures)
    elif cfg.direction_weighting == ZERO:
        # After the bound, before `median`: every row stays, those below the threshold as a
        # zero vote (strategies.zero_vote), so the median runs over the whole round.
        cosines, no_reference = reference_cosines(deltas, reference)
        below, chosen = lowest_below(cosines, no_reference, cfg.direction_min_cosine,
                                     cfg.zero_limit(len(deltas)))
        deltas, zeroed = zero_votes(deltas, below, chosen, cfg.direction_min_cosine, names)
        named = _cosine_figures(cosines, no_reference, names, reference)
        _direction_figures(figures, bound, {**named, **zeroed})
        # The rows the median takes, the zero votes among them (a minority: the median is
        # never 0 by the server's votes alone, so the round is never refused for them).
        figures["combined"] = len(deltas)
    elif cfg.norm_bound_direction != "off":
        # After the bound, so every kept row is bounded; before the rule, which then takes
        # the kept rows only.
        keep, checked = direction_check(deltas, cfg, names, reference)
        _direction_figures(figures, bound, checked)
        if not keep.any():  # `shortfall` keeps n > tolerate; a rule over no row is no mean
            return Aggregated(None, {**figures, "refused": EVERY_ROW_DROPPED})
        deltas, w = deltas[keep], w[keep]
        names = [n for n, k in zip(names, keep, strict=True) if k]
        figures["combined"] = len(deltas)
    delta, own = RULES[cfg.rule](deltas, w, cfg, names)
    return Aggregated(delta, {**figures, **own})
