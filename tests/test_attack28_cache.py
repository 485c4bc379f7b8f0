"""ATTACK28 (issue 28, target 3): the untrained-figures cache (new in issue 28) with planted
or malformed entries: one that cannot be read is recomputed, never a failed or hung run.
Each test fails on 2a908aa."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from fedtune.task import cache as task_cache

KEY = "0" * 24


def _entry(cache_dir: Path) -> Path:
    folder = cache_dir / task_cache.UNTRAINED_FOLDER / KEY
    folder.mkdir(parents=True)
    return folder / task_cache.UNTRAINED_FILE


def test_a_deeply_nested_untrained_entry_is_a_miss_not_a_crash(tmp_path: Path):
    """read_untrained returns None for a malformed (deeply nested) entry; it never raises."""
    _entry(tmp_path).write_text("[" * 200_000)
    try:
        got = task_cache.read_untrained(tmp_path, KEY)
    except RecursionError as exc:  # untrained_metrics runs after the last round: no summary
        raise AssertionError("a malformed cache entry raised RecursionError") from exc
    assert got is None


def test_a_fifo_planted_as_an_untrained_entry_never_hangs_the_run(tmp_path: Path):
    """read_untrained never blocks on a FIFO planted as metrics.json."""
    path = _entry(tmp_path)
    os.mkfifo(path)
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(task_cache.read_untrained(tmp_path, KEY)),
                              daemon=True)
    thread.start()
    thread.join(3.0)
    blocked = thread.is_alive()
    if blocked:  # release the reader: a writer opens and closes the FIFO
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(3.0)
    assert not blocked, "read_untrained blocked on a FIFO: the run hangs after its last round"
    assert got == [None]


def test_storing_untrained_figures_never_writes_through_a_link_planted_in_the_cache(tmp_path):
    """store_untrained never writes through a link planted as <cache_dir>/untrained."""
    cache_dir = tmp_path / "shared-cache"
    cache_dir.mkdir()
    elsewhere = tmp_path / "victim-folder"
    elsewhere.mkdir()
    (cache_dir / task_cache.UNTRAINED_FOLDER).symlink_to(elsewhere)
    figures = {name: 0.5 for name in task_cache.UNTRAINED_FIELDS}
    try:
        task_cache.store_untrained(cache_dir, KEY, figures)
    except OSError:
        pass  # refusing the link holds (untrained_metrics logs it and goes on)
    assert list(elsewhere.iterdir()) == [], "the cache entry was written through a planted link"
