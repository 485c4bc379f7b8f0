import datasets
import numpy as np
import pytest

from fedtune.data import tokenize_cached
from fedtune.models import load_backbone


@pytest.fixture(scope="module")
def tokenizer():
    return load_backbone("minilm").tokenizer


def test_shapes_dtypes_and_cache_hit(tmp_path, tokenizer, monkeypatch):
    ds = datasets.Dataset.from_dict({"text": ["hello world", "buy cheap pills now " * 20]})
    first = tokenize_cached(ds, tokenizer, 16, cache=tmp_path)
    assert first["input_ids"].shape == (2, 16) and first["input_ids"].dtype == np.int32
    assert first["attention_mask"].dtype == np.int8
    assert first["attention_mask"][0].sum() == 4 and first["attention_mask"][1].sum() == 16

    def boom(*args, **kwargs):
        raise AssertionError("tokenizer called on a cache hit")

    monkeypatch.setattr(type(tokenizer), "__call__", boom)
    second = tokenize_cached(ds, tokenizer, 16, cache=tmp_path)
    assert isinstance(second["input_ids"], np.memmap)
    assert np.array_equal(first["input_ids"], second["input_ids"])


def test_cache_key_changes_with_length_and_text(tmp_path, tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["hello world"]})
    tokenize_cached(ds, tokenizer, 8, cache=tmp_path)
    tokenize_cached(ds, tokenizer, 12, cache=tmp_path)
    tokenize_cached(datasets.Dataset.from_dict({"text": ["hello there"]}), tokenizer, 8,
                    cache=tmp_path)
    assert len(list((tmp_path / "tokens").iterdir())) == 3
