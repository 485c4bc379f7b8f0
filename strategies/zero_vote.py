"""The validation check's zero vote before the median: `aggregation.direction_weighting =
"zero"`, with `norm_bound_direction = "validation"` and rule `median` (the config refuses
any other combination).

The rows whose cosine to the server's validation descent direction is below
`direction_min_cosine` are replaced by zero rows, votes for "no change", the lowest first
and at most a minority of the round, floor((n - 1) / 2) of n rows; the coordinate-wise
median then runs over every row of the round. Nothing is dropped, so neither of the drop
check's failures before the median happens:
- capped at `tolerate`, the drop keeps a reversed row that scores above an honest one (the
  honest row is dropped in its place; benchmarks/RESULTS.md, eighth and ninth tables);
- lifted to a majority, the drop runs the median over fewer rows, without the dropped
  clients' honest data either (the exclusion gap of the ninth table).
A zero vote sits in the middle of every coordinate, where a reversed row sits at its
extreme, so it pulls the median towards "no change" instead of against the honest step.
Why a minority: with more than half of the rows zero votes the median is 0 on every
coordinate, so the server's rows would veto the round, and under DP-SGD noise three of
five honest rows often score below 0 (benchmarks/RESULTS.md, tenth table: uncapped, such
rounds stalled, 8 of 27, and the honest DP-SGD runs ended 6-9 points under the bounded
median's). With at most f = `tolerate` attackers and n >= 2f + 1, floor((n - 1) / 2) >= f,
so the cap can zero every attacker that scores lowest; an attacker that scores above the
zeroed honest rows stays, inside the median's bound. What it costs, measured (tenth
table): under DP-SGD a noisy row's coordinates have random signs, so two zero votes pull
the median of five towards 0 on most coordinates and the honest runs ended 5-6 points
under the bounded median's with the capped drop; it met the 2-point line on 10 of 12
cells, that rule on 11.

What it bounds, n rows of which at most f are an attacker's (n >= 2f + 1, refused below,
as for the median alone): the zero rows are the server's own, never an attacker's, so on
every coordinate the median lies within the range of the values that are not an
attacker's (the honest rows, kept or zeroed, and 0), whichever rows the check zeroes. With
every row's norm bounded by B around zero (a numeric or adaptive bound; with a centre, the
bound around zero it applies after, `bound_zero` in the record) the median has norm <=
sqrt(2) x B: on each coordinate at least half of the rows are as large as it (review
ATTACK33: the centred bound's own figure is a distance from the median, not a norm). An
attacker gains nothing from being zeroed (its vote becomes the most neutral one) and a row
it keeps must point the server's way or score above the rows zeroed.

What it does not bound: that range is the plain median's widened to 0. Where honest rows
are zeroed (a non-IID client pointing away from the server's rows), f attackers whose rows
are kept can hold the coordinates they choose at 0, no change, where the plain median
would stay inside the honest values (review ATTACK33: at n = 2f + 1 one zeroed honest row
is enough); they can stall chosen parameters, never push one past 0 or the honest range.
A row with a positive cosine (a targeted change orthogonal to the server's direction) is
kept, as by every check here. Zeroed honest rows slow the round.

Trust and privacy are the direction check's (strategies.robust, the validation check):
the server's validation rows choose the rows zeroed and no DP mechanism covers them; the
clients' epsilons are unchanged (post-processing of their deltas with the server's own
rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedtune.config import AggregationConfig

# How the round record names the weighting (`direction.weighting`).
ZERO = "zero"


# The most rows of a round that may be zero votes (floor((rows - 1) / 2)); the config's, as
# its cohort check refuses a cohort the limit leaves without one.
zero_limit = AggregationConfig.zero_limit


def zero_votes(deltas: np.ndarray, below: np.ndarray, zeroed: np.ndarray, min_cosine: float,
               ids: Sequence[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The rows with those of `zeroed` (the lowest of the rows `below` the threshold, at most
    `zero_limit`: strategies.robust.lowest_below) replaced by zeros, and the figures: the
    rows zeroed and the rows below the threshold the limit kept, one entry per row at most."""
    rows = np.where(zeroed[:, None], 0.0, deltas)
    return rows, {"weighting": ZERO, "min_cosine": min_cosine,
                  "zeroed": [i for i, z in zip(ids, zeroed, strict=True) if z],
                  "kept_below": [i for i, b, z in zip(ids, below, zeroed, strict=True)
                                 if b and not z],
                  "zero_limit": zero_limit(len(deltas))}
