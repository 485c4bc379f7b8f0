"""Rows at chosen cosines to a reference direction: the shape of a round the direction
checks and the trust weighting see (shared by their tests)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def rows_at(reference: np.ndarray, cosines: Iterable[float], rng: np.random.Generator,
            norm: float = 1.0) -> np.ndarray:
    """One row of norm `norm` per cosine: that much of `reference`'s direction and a random
    orthogonal remainder."""
    unit = reference / np.linalg.norm(reference)
    rows = []
    for c in cosines:
        v = rng.normal(size=reference.size)
        v -= (v @ unit) * unit
        rows.append(norm * (c * unit + np.sqrt(1.0 - c * c) * v / np.linalg.norm(v)))
    return np.asarray(rows)
