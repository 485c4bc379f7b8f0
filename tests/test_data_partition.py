import datasets
import numpy as np
import pytest

from fedtune.data import available_partitioners, partition


@pytest.fixture(scope="module")
def ds():
    rng = np.random.default_rng(0)
    labels = (rng.random(600) < 0.3).astype(int).tolist()
    lists = [["fork", "ilug", "exmh", ""][i % 4] if not y else "" for i, y in enumerate(labels)]
    return datasets.Dataset.from_dict({
        "text": [f"t{i}" for i in range(600)], "label": labels, "mailing_list": lists,
        "collection": ["set1" if i < 300 else "set2" for i in range(600)],
    }, features=datasets.Features({
        "text": datasets.Value("string"), "label": datasets.ClassLabel(names=["ham", "spam"]),
        "mailing_list": datasets.Value("string"), "collection": datasets.Value("string"),
    }))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_every_index_exactly_once_and_deterministic(ds, scheme):
    parts = partition(ds, scheme, 10, seed=1, alpha=0.5)
    flat = np.concatenate(parts)
    assert len(parts) == 10 and sorted(flat.tolist()) == list(range(len(ds)))
    again = partition(ds, scheme, 10, seed=1, alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(ds, scheme, 10, seed=2, alpha=0.5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    assert min(len(p) for p in parts) > 0


def test_dirichlet_is_label_skewed_and_iid_is_not(ds):
    labels = np.asarray(ds["label"])
    skew = [labels[p].mean() for p in partition(ds, "dirichlet", 10, seed=0, alpha=0.3)]
    flat = [labels[p].mean() for p in partition(ds, "iid", 10, seed=0)]
    assert np.std(skew) > 2 * np.std(flat), (skew, flat)


def test_natural_groups_by_column_with_fallback_for_empty_values(ds):
    # fork, ilug, exmh from lists; empty ham and all spam fall back to label-collection.
    parts = partition(ds, "natural", 7, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(ds)))
    with pytest.raises(ValueError, match=r"data.num_clients=20 but natural partitioning by "
                                         r"'mailing_list' gives 7 groups; set data.num_clients=7"):
        partition(ds, "natural", 20, seed=0)
    with pytest.raises(ValueError, match="data.by='sender' is not a column"):
        partition(ds, "natural", 2, seed=0, by="sender")


def test_unknown_scheme_and_too_many_clients(ds):
    with pytest.raises(ValueError, match="data.partition='random' is not one of: dirichlet, iid"):
        partition(ds, "random", 4, seed=0)
    with pytest.raises(ValueError, match="exceeds the 600 training examples"):
        partition(ds, "iid", 601, seed=0)
    assert available_partitioners() == ["dirichlet", "iid", "natural"]
