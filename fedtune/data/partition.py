"""Split a corpus among clients with flwr-datasets partitioners.

Returns index arrays into the dataset, so a client holds nothing but its indices and reads
the shared tokenized arrays through them.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

_INDEX = "__fedtune_index__"
PartitionerFactory = Callable[..., Partitioner]
_SCHEMES: dict[str, PartitionerFactory] = {}


def register_partitioner(name: str) -> Callable[[PartitionerFactory], PartitionerFactory]:
    def deco(factory: PartitionerFactory) -> PartitionerFactory:
        _SCHEMES[name] = factory
        return factory

    return deco


def available_partitioners() -> list[str]:
    return sorted(_SCHEMES)


@register_partitioner("iid")
def _iid(num_partitions: int, **_: object) -> Partitioner:
    return IidPartitioner(num_partitions=num_partitions)


@register_partitioner("dirichlet")
def _dirichlet(num_partitions: int, *, seed: int, alpha: float, min_partition_size: int,
               **_: object) -> Partitioner:
    return DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                alpha=alpha, min_partition_size=min_partition_size,
                                self_balancing=False, seed=seed)


@register_partitioner("natural")
def _natural(num_partitions: int, *, by: str, **_: object) -> Partitioner:
    return NaturalIdPartitioner(partition_by=by)


def natural_key(dataset: datasets.Dataset, by: str) -> datasets.Dataset:
    """Rows with an empty `by` value (spam has no mailing list) are grouped by collection
    and label instead, e.g. "spam-set1", so every row has an owner."""
    if by not in dataset.column_names:
        raise ValueError(f"data.by={by!r} is not a column of the corpus: {dataset.column_names}")
    values = [str(v) for v in dataset[by]]
    if all(values):
        return dataset
    fallback_cols = [c for c in ("collection",) if c in dataset.column_names]
    labels = dataset["label"]
    names = getattr(dataset.features["label"], "names", None)
    filled = []
    for i, value in enumerate(values):
        if value:
            filled.append(value)
            continue
        label = names[labels[i]] if names else str(labels[i])
        extra = "-" + str(dataset[i][fallback_cols[0]]) if fallback_cols else ""
        filled.append(f"{label}{extra}")
    return dataset.remove_columns(by).add_column(by, filled)


def partition(dataset: datasets.Dataset, scheme: str, num_partitions: int, *, seed: int,
              alpha: float = 0.5, by: str = "mailing_list", min_partition_size: int = 10
              ) -> list[np.ndarray]:
    """Index arrays, one per client, covering every row exactly once."""
    if scheme not in _SCHEMES:
        raise ValueError(f"data.partition={scheme!r} is not one of: "
                         f"{', '.join(available_partitioners())}")
    ds = dataset.add_column(_INDEX, np.arange(len(dataset)))
    if scheme == "natural":
        ds = natural_key(ds, by)
        groups = len(set(ds[by]))
        if groups != num_partitions:
            raise ValueError(f"data.num_clients={num_partitions} but natural partitioning by "
                             f"{by!r} gives {groups} groups; set data.num_clients={groups}")
    elif num_partitions > len(dataset):
        raise ValueError(f"data.num_clients={num_partitions} exceeds the {len(dataset)} "
                         "training examples")
    min_size = min(min_partition_size, len(dataset) // num_partitions)
    partitioner = _SCHEMES[scheme](num_partitions, seed=seed, alpha=alpha, by=by,
                                   min_partition_size=min_size)
    # IidPartitioner splits in dataset order; shuffle first so clients get random rows.
    partitioner.dataset = ds.shuffle(seed=seed) if scheme == "iid" else ds
    out = [np.sort(np.asarray(partitioner.load_partition(i)[_INDEX], dtype=np.int64))
           for i in range(num_partitions)]
    return out
