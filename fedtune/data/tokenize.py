"""Tokenize a corpus split once and cache the arrays on disk.

Every process of a run (the server, each Ray actor) needs the same token arrays. They are
computed once, saved as .npy under a key of everything that changes them, and re-opened
memory-mapped, so processes share the same pages instead of re-tokenizing and each holding a
copy. Files are written to a temp name and renamed into place: a concurrent process sees a
complete file or none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.config.runtime import runtime_settings
from fedtune.data.tokenizer_probe import tokenizer_behaviour
from fedtune.run.atomic import write_stream_atomic

if TYPE_CHECKING:
    import datasets

FIELDS = ("input_ids", "attention_mask")
DTYPES = {"input_ids": np.int32, "attention_mask": np.int8}
BATCH_SIZE = 1024


def default_cache_dir() -> Path:
    """`$FEDTUNE_CACHE_DIR` if set, else ~/.cache/fedtune (fedtune.config.runtime)."""
    return runtime_settings().cache_dir


def tokenizer_fingerprint(tokenizer: Any) -> bytes:
    """What makes two tokenizers tokenize alike: class, name/path, vocab size and, for a
    fast tokenizer, its full serialized pipeline (vocab, normalizer, post-processor), so a
    changed tokenizer in the same folder gets a new key; and what it does
    (`tokenizer_behaviour`), for the `tokenizer_config.json` switches applied outside the
    pipeline (`split_special_tokens` changes the ids cached)."""
    parts = [type(tokenizer).__qualname__, str(getattr(tokenizer, "name_or_path", "")),
             str(len(tokenizer)), str(getattr(tokenizer, "padding_side", "")),
             str(getattr(tokenizer, "truncation_side", ""))]
    parts.append(tokenizer_behaviour(tokenizer).decode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Drop the padding/truncation state: calling the tokenizer sets it, which would
        # otherwise change the key between the first and the second call.
        spec = {k: v for k, v in json.loads(backend.to_str()).items()
                if k not in ("padding", "truncation")}
        parts.append(hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest())
    return "\0".join(parts).encode()


def cache_key(dataset: datasets.Dataset, tokenizer: Any, max_length: int) -> str:
    """Hash of the tokenizer, `max_length` and the texts themselves (not the dataset's
    fingerprint, which datasets may randomise for in-memory tables)."""
    digest = hashlib.sha256(tokenizer_fingerprint(tokenizer))
    digest.update(f"\0max_length={max_length}\0".encode())
    for text in dataset["text"]:
        digest.update(text.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def tokenize_texts(texts: list[str], tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    """Padded to `max_length`, so a text gets the same arrays in training, evaluation and
    prediction whatever batch it arrives in."""
    out = {f: np.zeros((len(texts), max_length), dtype=DTYPES[f]) for f in FIELDS}
    for start in range(0, len(texts), BATCH_SIZE):
        enc = tokenizer(texts[start:start + BATCH_SIZE], max_length=max_length, truncation=True,
                        padding="max_length", return_tensors="np")
        for f in FIELDS:
            out[f][start:start + BATCH_SIZE] = enc[f]
    return out


def tokenize_cached(dataset: datasets.Dataset, tokenizer: Any, max_length: int,
                    cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """`input_ids` (int32) and `attention_mask` (int8), shape [N, max_length], padded and
    truncated to `max_length`. Row i is `dataset[i]["text"]`.

    Cached under `cache_dir` (default: `default_cache_dir()`) / "tokens" / key; a cache hit
    returns read-only memory maps and never calls the tokenizer.
    """
    if "text" not in dataset.column_names:
        raise ValueError(f"tokenize_cached needs a 'text' column; columns: {dataset.column_names}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"model.max_length={max_length!r} must be a positive integer")
    if len(dataset) == 0:  # nothing to cache, and an empty .npy cannot be memory-mapped
        return {f: np.zeros((0, max_length), dtype=DTYPES[f]) for f in FIELDS}
    folder = Path(cache_dir or default_cache_dir()) / "tokens" / cache_key(dataset, tokenizer,
                                                                            max_length)
    paths = {f: folder / f"{f}.npy" for f in FIELDS}
    if not all(p.is_file() for p in paths.values()):
        arrays = tokenize_texts(list(dataset["text"]), tokenizer, max_length)
        folder.mkdir(parents=True, exist_ok=True)
        for f, array in arrays.items():
            write_stream_atomic(paths[f], lambda fh, array=array: np.save(fh, array))
    return {f: np.load(p, mmap_mode="r") for f, p in paths.items()}
