"""Two-domain populations for population expansion: a small target population and the
source population that expands it.

Rows whose `data.domain_by` column equals `data.target_domain` belong to the target domain
and are split among partition ids 0 .. target_clients-1; every other row belongs to the
source domain and is split among the remaining ids. Each side uses the configured scheme
(`data.partition`), so the target population is exactly the one a target-only run
(num_clients = target_clients) gets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from fedtune.data.partition import PartitionError, partition

if TYPE_CHECKING:
    import datasets

    from fedtune.config import DataConfig


def target_rows(ds: datasets.Dataset, by: str, target: str, split: str) -> np.ndarray:
    """Sorted indices of the rows of `ds` in the target domain; a clear error if the column
    or the value does not exist."""
    if by not in ds.column_names:
        raise PartitionError(f"data.domain_by={by!r} is not a column of the {split} split; "
                             f"columns: {ds.column_names}")
    values = np.asarray(["" if v is None else str(v) for v in ds[by]])
    rows = np.flatnonzero(values == target)
    if rows.size == 0:
        found = sorted(set(values.tolist()))[:20]
        raise PartitionError(f"data.target_domain={target!r} matches no row of the {split} "
                             f"split by {by!r}; values there: {found}")
    return rows.astype(np.int64)


def partition_domains(ds: datasets.Dataset, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """Index arrays into `ds`: target clients first, then source clients."""
    target = target_rows(ds, cfg.domain_by, cfg.target_domain, "train")
    source = np.setdiff1d(np.arange(len(ds), dtype=np.int64), target)
    parts = _side(ds, target, cfg.target_clients, cfg, seed, "target")
    if cfg.source_clients:
        if source.size == 0:
            raise PartitionError(f"data.num_clients={cfg.num_clients} asks for "
                                 f"{cfg.source_clients} source clients but every train row "
                                 f"is in the target domain {cfg.target_domain!r}")
        parts += _side(ds, source, cfg.source_clients, cfg, seed, "source")
    return parts


def _side(ds: datasets.Dataset, rows: np.ndarray, clients: int, cfg: DataConfig, seed: int,
          side: str) -> list[np.ndarray]:
    try:
        with no_progress_bars():  # select + add_column draw a bar per actor otherwise
            local = partition(ds.select(rows), cfg.partition, clients, seed=seed,
                              alpha=cfg.alpha, by=cfg.by)
    except PartitionError as exc:
        raise PartitionError(f"{side} domain ({rows.size} rows, {clients} clients): "
                             f"{exc}") from None
    return [rows[p] for p in local]


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence `datasets`' progress bars inside the block (select and map draw one each)."""
    import datasets  # not at the top: see fedtune.data.corpora

    was_enabled = datasets.utils.are_progress_bars_disabled() is False
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.enable_progress_bars()
