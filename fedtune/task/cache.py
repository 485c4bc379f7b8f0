"""Built tasks kept on disk across runs: a repeat run of a task skips loading the corpus,
tokenizing and partitioning it (and importing `datasets` and flwr-datasets to do so).

An entry is a task bundle (`fedtune.task.task.write_bundle`: token arrays, labels, partitions,
validation rows, label names) under `<cache_dir>/tasks/<key>`. The key covers everything
that shapes those arrays:

- the config's fields that shape the data (`fedtune.task.task.data_key`: the seed, the data
  table, the token length; so runs that differ only in their method or privacy share it);
- each file the corpus reads, by path, size and modification time (a corpus that cannot
  list its files, such as a dataset from the Hugging Face cache, is never cached);
- the tokenizer (its serialized pipeline, as the token cache keys it);
- the versions of the libraries that cut the splits (`datasets`, flwr-datasets, numpy)
  and the source of fedtune's data code, so an upgrade or a fix (such as the rule that keeps
  copies of training rows out of validation and test) never serves stale splits.

Entries are written to a temporary folder and renamed into place, so a concurrent run sees
a whole entry or none; one that cannot be read is rebuilt. The cache holds nothing the
token cache beside it does not already derive from the same data.

Beside the tasks, `<cache_dir>/untrained/<key>` keeps the untrained model's validation and
test figures (`fedtune.task.evaluation.untrained_metrics`): every run of a task scores the same
seeded untrained model on the same rows, so a repeat run reads them instead of running both
evaluations again. Their key (`untrained_key`) is a digest of the rows evaluated themselves
(tokens, masks, labels: whatever built them) and of everything else that changes the
figures: the backbone's weights hash, the method and its initialisation, the evaluation's
batch size, cap and path, the thread count, the libraries that compute them (for an LM's
ROUGE-L also whether rouge-score can be imported: a null stored without it is not served
once it is installed) and fedtune's code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.data.corpora import corpus_sources
from fedtune.run.atomic import (
    is_real_folder,
    make_real_folder,
    write_folder_atomic,
    write_text_atomic,
)

FOLDER = "tasks"
# Libraries whose behaviour shapes the splits and partitions.
LIBRARIES = ("datasets", "flwr-datasets", "numpy")
# fedtune's code that shapes them (relative to the package).
CODE = ("data", "task/task.py", "task/cache.py", "task/rows.py", "task/kinds.py",
        "task/lm.py")  # the task kinds pick the rows and build the targets
UNTRAINED_FOLDER = "untrained"
UNTRAINED_FILE = "metrics.json"
# What the untrained model's figures hold: test and validation accuracy and loss.
UNTRAINED_FIELDS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "test_rouge_l")
# An untrained entry is five floats (about 180 bytes); a larger file is not one of ours.
UNTRAINED_MAX_BYTES = 4096
# Libraries whose arithmetic or initialisation shapes those figures.
UNTRAINED_LIBRARIES = ("torch", "transformers", "peft", "numpy")
# fedtune's code that builds, initialises and evaluates the model: the whole package, as that
# code spans many modules (a few milliseconds to read).
UNTRAINED_CODE = (".",)


def entry_key(data_fields: str, corpus: str, options: dict[str, Any],
              tokenizer_fingerprint: bytes) -> str | None:
    """The cache key of a task, or None when its corpus cannot be keyed (never cached)."""
    sources = corpus_sources(corpus, options)
    if not sources:
        return None
    digest = hashlib.sha256(data_fields.encode())
    for path in sources:
        try:
            stat = path.stat()
        except OSError:  # gone since it was listed: the loader will say so
            return None
        digest.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    digest.update(b"\0" + tokenizer_fingerprint)
    for name in LIBRARIES:
        digest.update(f"\0{name}={_version(name)}".encode())
    digest.update(b"\0" + _code_digest())
    return digest.hexdigest()[:24]


def lookup(cache_dir: Path, key: str) -> Path | None:
    """The entry's folder if it was written completely, else None."""
    folder = cache_dir / FOLDER / key
    return folder if folder.is_dir() else None


def store(cache_dir: Path, key: str, write: Callable[[Path], Any], folder: str = FOLDER
          ) -> Path:
    """Write an entry with `write(folder)` into a temporary folder and rename it into place;
    a concurrent run that stored the same key first keeps its entry. Returns the entry."""
    root = cache_dir / folder
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
    try:
        write(tmp)
        try:
            tmp.rename(final)
        except OSError:  # stored by another run meanwhile: same key, same content
            if not final.is_dir():
                raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    return final


def discard(folder: Path) -> None:
    """Remove an entry that could not be read (it is rebuilt and stored again)."""
    shutil.rmtree(folder, ignore_errors=True)


def untrained_key(rows: Iterable[np.ndarray], fields: Mapping[str, Any]) -> str:
    """The key of a task's untrained figures: a digest of the arrays evaluated (`rows`:
    dtype, shape and bytes of each), of `fields` (JSON values: the model, the method, the
    evaluation's settings), of the versions of UNTRAINED_LIBRARIES and of UNTRAINED_CODE."""
    digest = hashlib.sha256()
    for array in rows:
        array = np.ascontiguousarray(array)
        digest.update(f"\0{array.dtype.str}{array.shape}\0".encode())
        digest.update(array.tobytes())
    digest.update(b"\0" + json.dumps(dict(fields), sort_keys=True).encode())
    for name in UNTRAINED_LIBRARIES:
        digest.update(f"\0{name}={_version(name)}".encode())
    # The whole fedtune package (this module's grandparent folder).
    digest.update(b"\0" + _code_digest(Path(__file__).resolve().parents[1], UNTRAINED_CODE))
    return digest.hexdigest()[:24]


def read_untrained(cache_dir: Path, key: str) -> dict[str, float | None] | None:
    """The untrained figures stored under `key`, or None when there are none or they cannot
    be read (then they are computed and stored again). Anything else planted there is a miss,
    never a crash or a hang: a link on the path below `cache_dir` (never followed), a FIFO
    or device (opened non-blocking, refused by its type), an entry over UNTRAINED_MAX_BYTES
    or one JSON cannot parse (deep nesting raises RecursionError)."""
    folder = cache_dir / UNTRAINED_FOLDER / key
    if not (is_real_folder(folder.parent) and is_real_folder(folder)):
        return None
    try:
        fd = os.open(folder / UNTRAINED_FILE,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > UNTRAINED_MAX_BYTES:
            return None
        metrics = json.loads(os.read(fd, UNTRAINED_MAX_BYTES + 1))
    except Exception:  # noqa: BLE001 - an unreadable entry is recomputed, never a failed run
        return None
    finally:
        os.close(fd)
    if not isinstance(metrics, dict) or sorted(metrics) != sorted(UNTRAINED_FIELDS) or not all(
            value is None or (isinstance(value, float) and math.isfinite(value))
            for value in metrics.values()):
        return None
    return metrics


def store_untrained(cache_dir: Path, key: str, metrics: Mapping[str, float | None]) -> None:
    """Store a task's untrained figures under `key`: the entry's folder is made whole in a
    fresh temp folder and renamed into place, replacing what was there (an entry that could
    not be read, or a link planted under the key: moved aside, its target untouched), by
    `fedtune.run.atomic`'s writers. Raises OSError when `<cache_dir>/untrained` is a link
    (never written through). JSON writes a float as its shortest repr, which reads back to
    the same float: a run that reads them reports the very figures the run that computed
    them did."""
    text = json.dumps({name: metrics[name] for name in UNTRAINED_FIELDS})
    root = make_real_folder(cache_dir / UNTRAINED_FOLDER, "the untrained figures")
    write_folder_atomic(root / key,
                        lambda folder: write_text_atomic(folder / UNTRAINED_FILE, text))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _code_digest(package: Path | None = None, names: tuple[str, ...] = CODE) -> bytes:
    """A digest of fedtune's data code (`names`, default CODE, under `package`, default the
    `fedtune` package): the splits' rules (the validation carve, the copy rule of
    `data/duplicates.py`) live there, so changing one gives every task a new key and old
    entries are never read."""
    package = package or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in names:
        path = package / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(f"\0{file.relative_to(package)}\0".encode())
            digest.update(file.read_bytes())
    return digest.digest()
