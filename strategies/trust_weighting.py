"""FLTrust's trust score (Cao et al. 2021) as an aggregation weighting:
`aggregation.direction_weighting = "cosine"`, with `norm_bound_direction = "validation"`,
rule `mean` and a norm bound (the config refuses any other combination).

After the norm bound each row's aggregation weight is its server-owned weight times
max(0, cosine to the server's validation descent direction): a row against the server's
direction weighs 0, a row along it its full weight, a row in between in proportion. No row
is "dropped": where the direction check (`direction_check`, "drop") removes at most
`tolerate` rows, the lowest first, and so keeps a reversed row that is not the lowest, this
weights every row at cosine <= 0 by 0 whatever the others score (`tolerate` only sets the
share cap below).

What it bounds, a configured cohort of n (`train.clients_per_round`) under a norm bound B
with `tolerate` = f (n > f, or the config is refused): every row has norm <= B, and each
row's share of the round is its weight over the round's weights, capped at 1 / (n - f)
(`share_cap`); the excess is not handed to the other rows, so a round where few rows point
the server's way moves the model less, and a round with fewer rows than n (clients that
failed, a plugin that asked fewer) keeps the cohort's cap (review ATTACK30: a cap over the
rows that arrived rose to 1 as the round shrank). One row therefore moves the model by at
most B / (n - f), the capped drop's bound, and the aggregate by at most B.
Without the cap the shares were renormalized and a single kept row took the whole round
(review ATTACK27H): a targeted change at any positive cosine, however small (1e-12),
carried the whole round when the other rows scored <= 0, and under DP-SGD a client that
skipped the noise and sent a clean step at cosine 0.3 took 0.53 of a round of five (0.50 B
along its target); with the cap both take at most 1 / (n - f) = 0.25. The cap costs honest
rounds too: a row whose trusted weight is over a quarter of a round of five is cut to a
quarter (a large partition, or the only row that points the server's way under DP noise).
Without any positive cosine (every weight 0) the round makes no update: `aggregate`
refuses it with the reason in the round record, nothing divides by the zero sum, and the
run goes on. A row whose reference is zero (the server's gradient vanished: no direction)
keeps its server-owned weight, as "drop" keeps it.

Trust and privacy are the direction check's (strategies.robust, the validation check):
the server's validation rows set the weights and no DP mechanism covers them; the
clients' epsilons are unchanged (weighting DP-SGD deltas by the server's own rows is
post-processing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# How the round record names the weighting (`norm_bound.direction.weighting`).
COSINE = "cosine"
# Relative slack of the `capped` figure: w / sum(w) of an equal round can round over 1 / n.
CAP_ROUNDING = 1e-9
ZERO_TRUST = ("every row's trust weight is 0 (no row has a positive cosine to the server's "
              "validation direction): no update this round")


def trust_scores(cosines: np.ndarray, no_reference: np.ndarray) -> np.ndarray:
    """Each row's trust: max(0, cosine), and 1 where the row has no reference (a zero
    server direction says nothing against it)."""
    trust = np.maximum(np.asarray(cosines, dtype=np.float64), 0.0)
    return np.where(no_reference, 1.0, trust)


def share_cap(rows: int, cohort: int, tolerate: int) -> float:
    """The largest share of a round one row may take: 1 / (cohort - tolerate), the capped
    drop's mean over the rows it keeps, for the server's configured cohort (or the rows, if
    more), so a round that shrinks (clients that fail, a plugin that asks fewer) lowers what
    each row moves and never raises it (review ATTACK30). `shortfall` refuses a cohort or a
    round of no more rows than `tolerate`."""
    return 1.0 / (max(rows, cohort) - tolerate)


def trust_weighted(weights: np.ndarray, cosines: np.ndarray, no_reference: np.ndarray,
                   ids: Sequence[Any], cohort: int, tolerate: int
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """The rows' shares of the round (server-owned weight x trust, over the round's sum,
    each capped at `share_cap`; they sum to 1 or less) and the figures the round record
    keeps: each row's trust and share (0 for every row when the weights sum to 0: the
    caller refuses that round), the cap, and the rows that weigh 0 or were capped. One entry
    per row, so the figures are bounded by the cohort, not the model."""
    trust = trust_scores(cosines, no_reference)
    weighted = np.asarray(weights, dtype=np.float64) * trust
    total = float(weighted.sum())
    cap = share_cap(len(weighted), cohort, tolerate)
    uncapped = weighted / total if total > 0 else np.zeros_like(weighted)
    shares = np.minimum(uncapped, cap)
    figures = {"weighting": COSINE,
               "trust": [[i, four_significant(t)] for i, t in zip(ids, trust, strict=True)],
               "shares": [[i, four_significant(s)] for i, s in zip(ids, shares, strict=True)],
               "share_cap": four_significant(cap),
               # Lowered by the cap, not by a rounding of w / sum(w) over it (ATTACK30).
               "capped": [i for i, u in zip(ids, uncapped, strict=True)
                          if u > cap * (1 + CAP_ROUNDING)],
               "zero_weight": [i for i, w in zip(ids, weighted, strict=True) if w == 0.0]}
    return shares, figures


def four_significant(value: float) -> float:
    """A round-record figure to 4 significant digits: a cosine or trust of 1e-12 that
    carries a round reads as such, not as 0 (ATTACK27H)."""
    return float(f"{float(value):.4g}")
