"""ATTACK28 (issue 28, target 2): the one atomic writer and the run folder's appended logs,
attacked as a run-folder holder would (THREATS.md 7: nothing is written outside `--out`).
Each test fails on 2a908aa."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from fedtune.run.atomic import append_line, write_atomic
from fedtune.run.curator_log import append_curator
from fedtune.run.folder import CURATOR_FILE, RunFolderError, claim_run_folder

SECRET = {"round": 1, "per_client": [{"partition_id": 3, "node": 103, "loss": 0.25}]}


def test_a_new_run_never_appends_the_curator_log_into_a_planted_hardlink(tmp_path: Path):
    """A hardlink planted as curator_log.jsonl in a fresh --out never receives the curator's log."""
    outside = tmp_path / "attacker-readable.txt"  # e.g. a world-readable file of the planter
    outside.write_text("")
    out = tmp_path / "run"
    out.mkdir()
    os.link(outside, out / CURATOR_FILE)  # not a symlink: refuse_links and O_NOFOLLOW miss it
    try:
        folder = claim_run_folder(out)
    except RunFolderError:
        return  # refusing the planted file is one way to hold
    with folder:
        try:
            append_curator(out, SECRET)
        except OSError:
            pass  # refusing to append into a multiply-linked file is another
    assert outside.read_text() == "", "the curator's secret log was written outside --out"


def test_append_line_never_blocks_on_a_planted_fifo(tmp_path: Path):
    """append_line (rounds.jsonl, curator_log.jsonl) refuses a FIFO; never hangs or feeds it."""
    fifo = tmp_path / CURATOR_FILE
    os.mkfifo(fifo)
    outcome: list[object] = []

    def write() -> None:
        try:
            append_line(fifo, "secret cohort line", mode=0o600)
            outcome.append("written")
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    thread.join(3.0)
    blocked = thread.is_alive()
    if blocked:  # a reader (the planter) opens the FIFO: the blocked writer hands it the line
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        thread.join(3.0)
        os.close(reader)
    assert not blocked, "append_line blocked on a FIFO (the run hangs; a reader gets the log)"
    assert outcome and isinstance(outcome[0], OSError), f"append_line wrote into a FIFO: {outcome}"


def test_write_atomic_by_name_never_writes_through_a_swapped_temp_name(tmp_path: Path):
    """write_atomic by name never writes outside the folder when its temp name is swapped."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "outside.txt"
    victim.write_text("untouched")
    source = tmp_path / "state.bin"
    source.write_bytes(b"tensors")

    def racer_then_library_writer(tmp: str) -> None:
        # Someone with write access to the folder wins the race between _fresh_temp's
        # O_EXCL create (closed at once) and the library opening the name again.
        os.unlink(tmp)
        os.symlink(victim, tmp)
        shutil.copyfile(source, tmp)  # what export's writer does (save_file alike)

    # FIX28A: the by-name form is gone (writers hand bytes or write into the writer's own
    # file object), so handing a name-writer is refused before any temp file exists: a
    # TypeError, not an OSError. The racer never runs and nothing lands in the folder.
    with pytest.raises((OSError, TypeError)):
        write_atomic(out / "final_state.safetensors", racer_then_library_writer)
    assert victim.read_text() == "untouched", "write_atomic wrote through the swapped temp name"
    assert list(out.iterdir()) == [], "a temp file or a planted link was left in the folder"


def test_fedtune_report_never_writes_through_a_link_planted_in_the_run_folder(tmp_path: Path):
    """`fedtune report RUN` never writes through a link planted as RUN/report (its default)."""
    from fedtune.study.report import write_report

    run = tmp_path / "shared-run"
    run.mkdir()
    elsewhere = tmp_path / "victim-folder"
    elsewhere.mkdir()
    (run / "report").symlink_to(elsewhere)  # planted by whoever shared the run folder
    try:
        write_report([], run / "report")
    except (OSError, ValueError, RuntimeError):
        pass  # refusing the link holds
    assert list(elsewhere.iterdir()) == [], "the report was written through a planted link"
