"""Corpus registry: a name -> a `DatasetDict` with "train" and "test" splits and at least
`id`, `text` and `label` columns.

`spamassassin` is bundled; `hf` loads any Hugging Face dataset by name (from the local
cache, or online where a user has a network) or local csv/json/parquet files.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import datasets

CorpusLoader = Callable[..., datasets.DatasetDict]
_CORPORA: dict[str, CorpusLoader] = {}


class CorpusError(ValueError):
    """A corpus cannot be loaded as configured; names the file or option at fault."""


def register_corpus(name: str) -> Callable[[CorpusLoader], CorpusLoader]:
    def deco(loader: CorpusLoader) -> CorpusLoader:
        _CORPORA[name] = loader
        return loader

    return deco


def available_corpora() -> list[str]:
    return sorted(_CORPORA)


def load_corpus(name: str, **options: Any) -> datasets.DatasetDict:
    if name not in _CORPORA:
        raise CorpusError(f"data.corpus={name!r} is not one of: {', '.join(available_corpora())}")
    try:
        return _CORPORA[name](**options)
    except TypeError as exc:
        raise CorpusError(f"data.options for corpus {name!r}: {exc}") from None


def spamassassin_path() -> Path:
    return Path(str(resources.files("fedtune.data").joinpath("spamassassin",
                                                             "spamassassin.jsonl.gz")))


_SPAM_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "text": datasets.Value("string"),
    "label": datasets.ClassLabel(names=["ham", "spam"]),
    "collection": datasets.Value("string"),
    "group": datasets.Value("string"),
    "mailing_list": datasets.Value("string"),
})


@register_corpus("spamassassin")
def load_spamassassin(*, path: str | None = None) -> datasets.DatasetDict:
    """The bundled SpamAssassin corpus (see fedtune/data/spamassassin/README.md)."""
    file = Path(path) if path else spamassassin_path()
    if not file.is_file():
        raise CorpusError(f"corpus file not found: {file}")
    rows: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    try:
        with gzip.open(file, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                rec = json.loads(line)
                split = rec.pop("split")
                if split not in rows or set(rec) != set(_SPAM_FEATURES):
                    raise CorpusError(f"{file}:{lineno}: unexpected split or fields {sorted(rec)}")
                for key, value in rec.items():
                    rows[split].setdefault(key, []).append(value)
    except (OSError, EOFError, json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise CorpusError(f"corpus file {file} is malformed: {exc}") from None
    if not rows["train"] or not rows["test"]:
        raise CorpusError(f"corpus file {file} has an empty train or test split")
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(cols, features=_SPAM_FEATURES)
        for split, cols in rows.items()
    })


@register_corpus("hf")
def load_hf(*, path: str, name: str | None = None, data_files: Any = None,
            text_field: str = "text", label_field: str = "label", train_split: str = "train",
            test_split: str | None = "test", test_fraction: float = 0.2, seed: int = 0
            ) -> datasets.DatasetDict:
    """Any HF dataset (`path` = a hub name, or a loader such as "csv"/"json" with
    `data_files`). Without a test split, `test_fraction` of train is held out (seeded)."""
    loaded = datasets.load_dataset(path, name, data_files=data_files)
    if train_split not in loaded:
        raise CorpusError(f"dataset {path!r} has no split {train_split!r}: {list(loaded)}")
    if test_split and test_split in loaded:
        train, test = loaded[train_split], loaded[test_split]
    else:
        parts = loaded[train_split].train_test_split(test_size=test_fraction, seed=seed)
        train, test = parts["train"], parts["test"]
    out = {}
    for split, ds in (("train", train), ("test", test)):
        for field in (text_field, label_field):
            if field not in ds.column_names:
                raise CorpusError(f"dataset {path!r} split {split!r} has no column {field!r}; "
                                  f"columns: {ds.column_names}")
        ds = ds.rename_columns({k: v for k, v in ((text_field, "text"), (label_field, "label"))
                                if k != v})
        if "id" not in ds.column_names:
            ds = ds.add_column("id", [f"{split}-{i}" for i in range(len(ds))])
        out[split] = ds
    label = out["train"].features["label"]
    if isinstance(label, datasets.Value) and label.dtype == "string":
        names = sorted(set(out["train"]["label"]) | set(out["test"]["label"]))
        out = {s: ds.cast_column("label", datasets.ClassLabel(names=names))
               for s, ds in out.items()}
    return datasets.DatasetDict(out)
