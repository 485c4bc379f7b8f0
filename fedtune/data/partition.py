"""Split a corpus among clients with flwr-datasets partitioners.

`partition` returns index arrays into the dataset rather than datasets: a client then holds
nothing but its indices and reads the shared, memory-mapped token arrays through them
(fedtune.data.tokenize), so thousands of virtual clients cost no copies.

Schemes (registered by name, see `available_partitioners`):
- `iid`: rows shuffled with `seed`, then cut into equal shards (`IidPartitioner`).
- `dirichlet`: per label, client shares drawn from Dir(alpha) (`DirichletPartitioner`
  on the `label` column); smaller alpha = more label skew.
- `natural`: one client per value of the `by` column (`NaturalIdPartitioner`), e.g. one per
  mailing list. See `natural_groups` for how empty values and tiny groups are handled.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from fedtune.compat.flwr_datasets import quiet_natural_partitioner

if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

# flwr-datasets is imported where used: its package import pulls in its plotting helpers
# (seaborn, matplotlib, scipy.stats), ~2 s of CPU, in every process that reads the
# partitioner registry (config validation included), Ray actors too.


class PartitionError(ValueError):
    """The corpus cannot be split as configured; the message names the data.* field."""

_INDEX = "__fedtune_index__"
_GROUP = "__fedtune_group__"
OTHER = "other"
DEFAULT_MIN_PARTITION_SIZE = 10

# (dataset with an index column, num_partitions, options) -> a partitioner with the dataset set
PartitionerFactory = Callable[..., "Partitioner"]
_SCHEMES: dict[str, PartitionerFactory] = {}


def register_partitioner(name: str) -> Callable[[PartitionerFactory], PartitionerFactory]:
    """Register a scheme. The factory gets `(dataset, num_partitions, *, seed, alpha, by,
    min_partition_size)` and returns a flwr-datasets `Partitioner` whose dataset is set."""

    def deco(factory: PartitionerFactory) -> PartitionerFactory:
        _SCHEMES[name] = factory
        return factory

    return deco


def available_partitioners() -> list[str]:
    """Registered scheme names, sorted."""
    return sorted(_SCHEMES)


def natural_groups(dataset: datasets.Dataset, by: str = "mailing_list",
                   min_partition_size: int | None = None) -> list[str]:
    """The group of each row for `natural` partitioning (partition i = i-th sorted name).

    - An empty value in `by` (most spam and personal mail have no mailing list) becomes
      "<label name>-<collection>", e.g. "spam-set1": those messages still need an owner, and
      a spam-only client is a realistic user (a spam trap), unlike one random bucket.
    - Groups with fewer than `min_partition_size` rows (default 10) are merged into one
      "other" group: a 1-message client trains on nothing useful, yet every client costs a
      round trip. Pass min_partition_size=1 to keep every group.
    """
    if by not in dataset.column_names:
        raise PartitionError(f"data.by={by!r} is not a column of the corpus; columns: "
                         f"{[c for c in dataset.column_names if c != _INDEX]}")
    min_size = DEFAULT_MIN_PARTITION_SIZE if min_partition_size is None else min_partition_size
    values = ["" if v is None else str(v) for v in dataset[by]]
    if not all(values):
        labels = dataset["label"] if "label" in dataset.column_names else [""] * len(values)
        names = getattr(dataset.features.get("label"), "names", None)
        collections = (dataset["collection"] if "collection" in dataset.column_names
                       else [""] * len(values))
        for i, value in enumerate(values):
            if not value:
                label = names[labels[i]] if names else str(labels[i])
                values[i] = "-".join(p for p in (label, str(collections[i])) if p) or "none"
    sizes = Counter(values)
    return [v if sizes[v] >= min_size else OTHER for v in values]


@register_partitioner("iid")
def _iid(ds: datasets.Dataset, num_partitions: int, *, seed: int, **_: object) -> Partitioner:
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_partitions)
    # IidPartitioner cuts contiguous shards in dataset order; shuffle so shards are random.
    partitioner.dataset = ds.shuffle(seed=seed)
    return partitioner


@register_partitioner("dirichlet")
def _dirichlet(ds: datasets.Dataset, num_partitions: int, *, seed: int, alpha: float,
               min_partition_size: int | None, **_: object) -> Partitioner:
    if "label" not in ds.column_names:
        raise PartitionError("dirichlet partitioning needs a 'label' column; columns: "
                         f"{[c for c in ds.column_names if c != _INDEX]}")
    if min_partition_size is None:  # at most 10, and at most half the average client
        min_partition_size = max(1, min(DEFAULT_MIN_PARTITION_SIZE,
                                        len(ds) // (2 * num_partitions)))
    if min_partition_size * num_partitions > len(ds):
        raise PartitionError(f"min_partition_size={min_partition_size} x data.num_clients="
                         f"{num_partitions} exceeds the {len(ds)} training examples")
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                       alpha=float(alpha), min_partition_size=min_partition_size,
                                       self_balancing=False, seed=seed)
    partitioner.dataset = ds
    with warnings.catch_warnings():
        # DirichletPartitioner warns on each redraw; only the final failure matters.
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        try:
            partitioner.num_partitions  # noqa: B018 - draws the assignment now
        except ValueError as exc:
            raise PartitionError(
                f"dirichlet partitioning of {len(ds)} rows into data.num_clients="
                f"{num_partitions} with data.alpha={alpha} could not give every client "
                f"min_partition_size={min_partition_size} rows: {exc} Raise data.alpha or "
                "lower data.num_clients.") from None
    return partitioner


@register_partitioner("natural")
def _natural(ds: datasets.Dataset, num_partitions: int, *, by: str,
             min_partition_size: int | None, **_: object) -> Partitioner:
    groups = natural_groups(ds, by, min_partition_size)
    found = len(set(groups))
    if found != num_partitions:
        listed = ", ".join(sorted(set(groups))[:40])
        raise PartitionError(f"data.num_clients={num_partitions} but natural partitioning by "
                         f"{by!r} gives {found} groups; set data.num_clients={found} "
                         f"(groups: {listed})")
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by=_GROUP)
    partitioner.dataset = ds.add_column(_GROUP, groups)
    return partitioner


def partition(dataset: datasets.Dataset, scheme: str, num_partitions: int, *, seed: int,
              alpha: float = 0.5, by: str = "mailing_list",
              min_partition_size: int | None = None) -> list[np.ndarray]:
    """Sorted int64 index arrays into `dataset`, one per client, covering every row once.

    Deterministic for a given `seed` (`natural` does not depend on it). `alpha` is used by
    `dirichlet`, `by` by `natural`. `min_partition_size`: for `dirichlet`, every client gets
    at least this many rows (flwr-datasets redraws up to 10 times, then this raises); default
    min(10, rows // (2 * num_partitions)). For `natural`, groups smaller than this merge into
    "other" (default 10).
    """
    if scheme not in _SCHEMES:
        raise PartitionError(f"data.partition={scheme!r} is not one of: "
                         f"{', '.join(available_partitioners())}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int | np.integer) \
            or num_partitions < 1:
        raise PartitionError(f"data.num_clients={num_partitions!r} must be a positive integer")
    if min_partition_size is not None and min_partition_size < 1:
        raise PartitionError(f"min_partition_size={min_partition_size} must be >= 1")
    if scheme != "natural" and num_partitions > len(dataset):
        raise PartitionError(f"data.num_clients={num_partitions} exceeds the {len(dataset)} "
                         "training examples")
    # No scheme reads the texts, and adding the index column to a row selection (the
    # validation split's complement) rewrites every column kept: most of the time here.
    if by != "text" and "text" in dataset.column_names:
        dataset = dataset.remove_columns("text")
    ds = dataset.add_column(_INDEX, np.arange(len(dataset), dtype=np.int64))
    partitioner = _SCHEMES[scheme](ds, int(num_partitions), seed=seed, alpha=alpha, by=by,
                                   min_partition_size=min_partition_size)
    with quiet_natural_partitioner():
        parts = [partitioner.load_partition(i)[_INDEX] for i in range(num_partitions)]
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
