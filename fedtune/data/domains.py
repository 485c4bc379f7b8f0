"""Two-domain populations for population expansion: a small target population and the
source population that expands it.

Rows whose `data.domain_by` column equals `data.target_domain` (or any of its values, when
it is a list: e.g. the small mailing lists of a corpus) belong to the target domain and are
split among partition ids 0 .. target_clients-1; every other row belongs to the source
domain and is split among the remaining ids. Each side uses the configured scheme
(`data.partition`), so the target population is exactly the one a target-only run
(num_clients = target_clients) gets. With `natural` partitioning each side gets one client
per `data.by` group of its own rows, groups under 10 rows merged into one "other" client per
side (fedtune.data.partition.natural_groups); `natural_side_groups` lists them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedtune.data.partition import (
    DEFAULT_MIN_PARTITION_SIZE,
    PartitionError,
    natural_groups,
    partition,
)

if TYPE_CHECKING:
    import datasets

    from fedtune.config import DataConfig

# Values named in one error line, at most (a list can hold thousands), and their length.
_SHOWN = 20
_CHARS = 120


def target_rows(ds: datasets.Dataset, by: str, target: str | Sequence[str], split: str,
                *, every_value: bool | None = None) -> np.ndarray:
    """Sorted indices of the rows of `ds` in the target domain (`by` equals `target` or one
    of its values); a clear error if the column does not exist or no row matches.

    `every_value` (default: on for every split but "test"): each value must match some row,
    the unknown ones named in one line (a typo never silently shrinks the target domain).
    The test split only needs a target row at all: a small list may have no test message."""
    if by not in ds.column_names:
        raise PartitionError(f"data.domain_by={by!r} is not a column of the {split} split; "
                             f"columns: {ds.column_names}")
    wanted = [target] if isinstance(target, str) else list(target)
    values = np.asarray(["" if v is None else str(v) for v in ds[by]])
    rows = np.flatnonzero(np.isin(values, np.asarray(wanted, dtype=str)))
    if every_value is None:
        every_value = split != "test"
    present = set(values[rows].tolist())
    missing = [v for v in wanted if v not in present] if every_value else []
    if rows.size == 0 or missing:
        found = sorted(set(values.tolist()))[:_SHOWN]
        named = [v[:_CHARS] for v in missing or wanted]
        what = (repr(named[0]) if isinstance(target, str) else
                f"value{'s' if len(named) > 1 else ''} {named[:_SHOWN]}"
                + (f" (+{len(named) - _SHOWN} more)" if len(named) > _SHOWN else ""))
        raise PartitionError(f"data.target_domain={what} matches no row of the {split} "
                             f"split by {by!r}; values there: {found}")
    return rows.astype(np.int64)


def partition_domains(ds: datasets.Dataset, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """Index arrays into `ds`: target clients first, then source clients."""
    # `ds` is the training split less the validation rows: a value whose few rows all went
    # to validation leaves no client row, which is not a typo (`target_rows` of the whole
    # split, in the task, has already named any unknown value).
    target = target_rows(ds, cfg.domain_by, cfg.target_domain, "train", every_value=False)
    source = np.setdiff1d(np.arange(len(ds), dtype=np.int64), target)
    if cfg.partition == "natural":
        _check_natural_counts(ds, target, source, cfg)
    parts = _side(ds, target, cfg.target_clients, cfg, seed, "target")
    if cfg.source_clients:
        if source.size == 0:
            raise PartitionError(f"data.num_clients={cfg.num_clients} asks for "
                                 f"{cfg.source_clients} source clients but every train row "
                                 f"is in the target domain {cfg.target_domain!r}")
        parts += _side(ds, source, cfg.source_clients, cfg, seed, "source")
    return parts


def natural_side_groups(ds: datasets.Dataset, target: np.ndarray, source: np.ndarray, by: str
                  ) -> tuple[list[str], list[str]]:
    """The `natural` groups of each side (target rows, source rows of `ds`), sorted: one
    client each."""
    def groups(rows: np.ndarray) -> list[str]:
        if rows.size == 0:
            return []
        return sorted(set(natural_groups(ds.select(rows), by)))

    with no_progress_bars():
        return groups(target), groups(source)


def _check_natural_counts(ds: datasets.Dataset, target: np.ndarray, source: np.ndarray,
                          cfg: DataConfig) -> None:
    """One line with the right numbers when data.target_clients or data.num_clients does
    not match the groups natural partitioning gives each side. A target-only run
    (num_clients = target_clients) leaves the source rows out, whatever their groups."""
    target_groups, source_groups = natural_side_groups(ds, target, source, cfg.by)
    t, s = len(target_groups), len(source_groups)
    if t == cfg.target_clients and cfg.source_clients in (0, s):
        return

    def listed(groups: list[str]) -> str:
        more = f", +{len(groups) - _SHOWN} more" if len(groups) > _SHOWN else ""
        return ", ".join(groups[:_SHOWN]) + more or "none"

    raise PartitionError(
        f"data.target_clients={cfg.target_clients} and data.num_clients={cfg.num_clients}, "
        f"but natural partitioning by {cfg.by!r} gives {t} target and {s} source groups "
        f"(groups under {DEFAULT_MIN_PARTITION_SIZE} rows merged into 'other' on each side); set "
        f"data.target_clients={t} and data.num_clients={t} (target only) or {t + s} (with "
        f"the source) (target: {listed(target_groups)}; source: {listed(source_groups)})")


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
