"""The server's validation split: a seeded, label-stratified share of the TRAINING rows.

Everything that selects (the best round, a sweep's choice of hyper-parameters) reads this
split, so the test split stays unseen until the final model is measured: learning rates
chosen on test accuracy over-fit the test split and did not transfer to a second corpus.
The rows are carved before the clients' partitions, which are cut from what is left, so no
client ever trains on a row the server validates on; and a row with a copy elsewhere in the
training split (fedtune.data.duplicates) is passed over, so none trains on a copy of one either.
"""

from __future__ import annotations

import numpy as np

from fedtune.data import PartitionError

# Mixed into the seed so the carve draws from a stream of its own: the partitioners use
# `seed` itself, and sharing their stream would tie which rows are held out to how the
# rest is partitioned.
_STREAM = 0x56414C  # "VAL"


def carve_validation(labels: np.ndarray, fraction: float, seed: int,
                     among: np.ndarray | None = None, copied: np.ndarray | None = None
                     ) -> np.ndarray:
    """Indices into `labels` of the validation rows: round(fraction x rows) of each label
    among the rows `among` (default: all), in a seeded random order, so any prefix (an
    evaluation capped by `train.eval_max_examples`) is a fair sample. Empty for
    fraction 0; a PartitionError naming `data.validation_fraction` if it carves no row.

    `copied` (a bool per row) marks rows never to draw, those with a copy elsewhere in the
    training split: each label's seeded order skips them and takes the next rows instead,
    so the carve keeps its size (unless too few unmarked rows of a label are left) and,
    where no row is marked, is the carve without `copied`."""
    labels = np.asarray(labels)
    pool = np.arange(labels.size, dtype=np.int64) if among is None else \
        np.asarray(among, dtype=np.int64)
    if fraction == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([_STREAM, seed])
    picked = []
    for label in np.unique(labels[pool]):
        rows = pool[labels[pool] == label]
        take = int(np.floor(fraction * rows.size + 0.5))
        order = rng.permutation(rows)
        if copied is not None:
            order = order[~np.asarray(copied, dtype=bool)[order]]
        picked.append(order[:take])
    rows = rng.permutation(np.concatenate(picked)).astype(np.int64)
    if rows.size == 0:
        raise PartitionError(f"data.validation_fraction={fraction} carves 0 of {pool.size} "
                             "training rows; raise it, or set 0 for no validation split")
    if rows.size == pool.size:
        raise PartitionError(f"data.validation_fraction={fraction} takes all {pool.size} "
                             "training rows it draws from; lower it")
    return rows


def passed_over(labels: np.ndarray, fraction: float, seed: int, among: np.ndarray | None,
                copied: np.ndarray) -> int:
    """How many rows the carve without `copied` would have drawn that carry a copy (the
    validation rows the copy rule replaced)."""
    return int(np.count_nonzero(np.asarray(copied, dtype=bool)[
        carve_validation(labels, fraction, seed, among)]))


def client_rows(num_rows: int, validation_rows: np.ndarray) -> np.ndarray:
    """The training rows left for the clients' partitions, sorted."""
    return np.setdiff1d(np.arange(num_rows, dtype=np.int64), validation_rows)
