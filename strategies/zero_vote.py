"""The validation check's zero vote before the median: `aggregation.direction_weighting =
"zero"`, with `norm_bound_direction = "validation"` and rule `median` (the config refuses
any other combination).

Each row whose cosine to the server's validation descent direction is below
`direction_min_cosine` is replaced by a zero row, a vote for "no change", and the
coordinate-wise median runs over every row of the round. Nothing is dropped, so neither of
the drop check's failures before the median happens:
- capped at `tolerate`, the drop keeps a reversed row that scores above an honest one (the
  honest row is dropped in its place; benchmarks/RESULTS.md, eighth and ninth tables);
- lifted to a majority, the drop runs the median over fewer rows, without the dropped
  clients' honest data either (the exclusion gap of the ninth table).
A zero vote sits in the middle of every coordinate, where a reversed row sits at its
extreme, so it pulls the median towards "no change" instead of against the honest step. A
round where many rows point away from the server moves the model less, as the trust
weighting's capped shares do before the mean.

What it bounds, n rows of which at most f = `tolerate` are an attacker's (n >= 2f + 1,
refused below, as for the median alone): the zero rows are the server's own, never an
attacker's, so on every coordinate the median lies within the range of the values that are
not an attacker's (the honest rows, kept or zeroed, and 0), whichever rows the check
zeroes and however many. With a norm bound B first every row has norm <= B, so the
median has norm <= sqrt(2) x B (on each coordinate at least half of the rows are as large
as it), and each coordinate stays within the bounded honest rows' range or 0. An attacker
gains nothing from being zeroed (its vote becomes the most neutral one) and a row it keeps
must point the server's way. What it does not bound:
a row with a positive cosine (a targeted change orthogonal to the server's direction) is
kept, as by every check here; zeroing honest rows slows the round (every row zeroed: no
update, the round record says why).

Trust and privacy are the direction check's (strategies.robust, the validation check):
the server's validation rows choose the rows zeroed and no DP mechanism covers them; the
clients' epsilons are unchanged (post-processing of their deltas with the server's own
rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# How the round record names the weighting (`direction.weighting`).
ZERO = "zero"
EVERY_ROW_ZEROED = ("the direction check zeroed every row (none has a cosine to the "
                    "server's validation direction at or above the threshold): no update "
                    "this round")


def zero_votes(deltas: np.ndarray, cosines: np.ndarray, no_reference: np.ndarray,
               min_cosine: float, ids: Sequence[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The rows with every row below `min_cosine` replaced by zeros (a row with no
    reference, a zero server direction, is kept: nothing speaks against it), and the
    figures: the rows zeroed, one entry per row at most."""
    zeroed = (np.asarray(cosines) < min_cosine) & ~np.asarray(no_reference, dtype=bool)
    rows = np.where(zeroed[:, None], 0.0, deltas)
    return rows, {"weighting": ZERO, "min_cosine": min_cosine,
                  "zeroed": [i for i, z in zip(ids, zeroed, strict=True) if z]}
