"""flwr-datasets: a quiet NaturalIdPartitioner.

`NaturalIdPartitioner` draws a tqdm bar while it indexes a corpus (one stray stderr line per
Ray actor per run) and has no public switch to turn it off. `quiet_natural_partitioner`
swaps the `tqdm` name its module reads for tqdm with `disable=True` while the block runs,
and puts the original back after, on the flwr-datasets versions it was checked on (the
module does `from tqdm import tqdm` and calls `tqdm(...)` with no `disable=`: 0.6.x).
Elsewhere it changes nothing (the bar shows), and says so once in the log: a cosmetic
patch never fails a run.

This replaces a `unittest.mock.patch.object` in production code (issue 28).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger(__name__)

# flwr-datasets minor versions whose natural_id_partitioner was read for the patch.
TESTED_VERSIONS = frozenset({"0.6"})

_lock = threading.Lock()  # one swap at a time: the name is module-global
_fallback_logged: list[str] = []


def flwr_datasets_version() -> str:
    """The installed flwr-datasets' version ("" when it is not installed)."""
    try:
        return version("flwr-datasets")
    except PackageNotFoundError:
        return ""


def is_tested(installed: str) -> bool:
    """Whether `installed`'s major.minor is one the patch was checked on."""
    return ".".join(installed.split(".")[:2]) in TESTED_VERSIONS


@contextlib.contextmanager
def quiet_natural_partitioner(installed: str | None = None) -> Iterator[bool]:
    """NaturalIdPartitioner without its progress bar inside the block; yields whether the
    bar is silenced (False outside TESTED_VERSIONS or if the module has no `tqdm` name)."""
    from flwr_datasets.partitioner import natural_id_partitioner as module

    installed = flwr_datasets_version() if installed is None else installed
    bar = getattr(module, "tqdm", None)
    if not is_tested(installed) or bar is None:
        if installed not in _fallback_logged:
            _fallback_logged.append(installed)
            log.info("flwr-datasets %s is not one the quiet-bar patch was checked on "
                     "(%s): natural partitioning shows its progress bar",
                     installed or "(not installed)", ", ".join(sorted(TESTED_VERSIONS)))
        yield False
        return
    with _lock:
        module.tqdm = functools.partial(bar, disable=True)
        try:
            yield True
        finally:
            module.tqdm = bar
