"""Tokenize a corpus split once and cache the arrays on disk.

Arrays are saved as .npy and re-opened memory-mapped: every process (the server, each Ray
actor) shares the same pages instead of holding its own copy.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import datasets
import numpy as np

FIELDS = ("input_ids", "attention_mask")


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE_DIR") or Path.home() / ".cache" / "fedtune")


def cache_key(dataset: datasets.Dataset, tokenizer: object, max_length: int) -> str:
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    digest.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    digest.update(str(len(tokenizer)).encode())  # type: ignore[arg-type]
    digest.update(str(max_length).encode())
    for text in dataset["text"]:
        digest.update(text.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def tokenize_cached(dataset: datasets.Dataset, tokenizer: object, max_length: int,
                    cache: Path | None = None) -> dict[str, np.ndarray]:
    """`input_ids` (int32) and `attention_mask` (int8), shape [N, max_length]."""
    folder = (cache or cache_dir()) / "tokens" / cache_key(dataset, tokenizer, max_length)
    paths = {f: folder / f"{f}.npy" for f in FIELDS}
    if not all(p.exists() for p in paths.values()):
        enc = tokenizer(list(dataset["text"]), max_length=max_length, truncation=True,  # type: ignore[operator]
                        padding="max_length", return_tensors="np")
        arrays = {"input_ids": enc["input_ids"].astype(np.int32),
                  "attention_mask": enc["attention_mask"].astype(np.int8)}
        folder.mkdir(parents=True, exist_ok=True)
        for field, array in arrays.items():
            # Write then rename: a concurrent reader never sees a half-written file.
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npy.tmp")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, array)
            os.replace(tmp, paths[field])
    return {f: np.load(p, mmap_mode="r") for f, p in paths.items()}
