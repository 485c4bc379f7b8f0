"""Partitioning: every row exactly once, seeded, and each scheme's promised shape."""

import datasets
import numpy as np
import pytest

from fedtune.data import available_partitioners, natural_groups, partition

N = 600


@pytest.fixture(scope="module")
def ds() -> datasets.Dataset:
    rng = np.random.default_rng(0)
    labels = (rng.random(N) < 0.3).astype(int).tolist()
    # Ham on three lists or none; spam never on a list; "tiny" has 3 rows.
    lists = [["fork", "ilug", "exmh", ""][i % 4] if not y else "" for i, y in enumerate(labels)]
    for i in (1, 5, 9):
        lists[i] = "tiny"
    return datasets.Dataset.from_dict({
        "text": [f"t{i}" for i in range(N)], "label": labels, "mailing_list": lists,
        "collection": ["set1" if i < N // 2 else "set2" for i in range(N)],
    }, features=datasets.Features({
        "text": datasets.Value("string"), "label": datasets.ClassLabel(names=["ham", "spam"]),
        "mailing_list": datasets.Value("string"), "collection": datasets.Value("string"),
    }))


def _covers_once(parts: list[np.ndarray]) -> bool:
    return sorted(np.concatenate(parts).tolist()) == list(range(N))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_every_index_exactly_once_and_deterministic_per_seed(ds, scheme):
    parts = partition(ds, scheme, 10, seed=1, alpha=0.5)
    assert len(parts) == 10 and _covers_once(parts)
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    again = partition(ds, scheme, 10, seed=1, alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(ds, scheme, 10, seed=2, alpha=0.5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_is_balanced_and_dirichlet_is_label_skewed(ds):
    labels = np.asarray(ds["label"])
    iid = partition(ds, "iid", 10, seed=0)
    assert {len(p) for p in iid} == {N // 10}
    skew = [labels[p].mean() for p in partition(ds, "dirichlet", 10, seed=0, alpha=0.3)]
    flat = [labels[p].mean() for p in iid]
    assert np.std(skew) > 2 * np.std(flat), (skew, flat)


def test_dirichlet_respects_min_partition_size_or_says_why(ds):
    parts = partition(ds, "dirichlet", 5, seed=0, alpha=1.0, min_partition_size=40)
    assert _covers_once(parts) and min(len(p) for p in parts) >= 40
    with pytest.raises(ValueError, match="min_partition_size=100 x data.num_clients=10 exceeds"):
        partition(ds, "dirichlet", 10, seed=0, min_partition_size=100)
    with pytest.raises(ValueError, match="could not give every client min_partition_size=50"):
        partition(ds, "dirichlet", 10, seed=0, alpha=0.05, min_partition_size=50)


def test_natural_groups_fill_empty_values_and_fold_tiny_groups(ds):
    groups = natural_groups(ds)
    assert set(groups) == {"fork", "ilug", "exmh", "ham-set1", "ham-set2", "spam-set1",
                           "spam-set2", "other"}
    assert [groups[i] for i in (1, 5, 9)] == ["other"] * 3
    assert "tiny" in natural_groups(ds, min_partition_size=1)

    parts = partition(ds, "natural", 8, seed=0)
    assert _covers_once(parts)
    names = sorted(set(groups))  # partition i holds the i-th group name, sorted
    for name, part in zip(names, parts, strict=True):
        assert {groups[i] for i in part} == {name}
    assert all(np.array_equal(a, b) for a, b in
               zip(parts, partition(ds, "natural", 8, seed=5), strict=True))


def test_natural_mismatch_and_bad_column_errors(ds):
    with pytest.raises(ValueError, match=r"data.num_clients=20 but natural partitioning by "
                                         r"'mailing_list' gives 8 groups; set data.num_clients=8"):
        partition(ds, "natural", 20, seed=0)
    with pytest.raises(ValueError, match="data.by='sender' is not a column"):
        partition(ds, "natural", 2, seed=0, by="sender")
    by_collection = partition(ds, "natural", 2, seed=0, by="collection")
    assert [len(p) for p in by_collection] == [N // 2, N // 2]


def test_unknown_scheme_and_bad_client_counts(ds):
    assert available_partitioners() == ["dirichlet", "iid", "natural"]
    with pytest.raises(ValueError, match="data.partition='random' is not one of: "
                                         "dirichlet, iid, natural"):
        partition(ds, "random", 4, seed=0)
    with pytest.raises(ValueError, match="exceeds the 600 training examples"):
        partition(ds, "iid", 601, seed=0)
    with pytest.raises(ValueError, match="data.num_clients=0 must be a positive integer"):
        partition(ds, "iid", 0, seed=0)
