"""Stop a run on the first Ctrl-C (SIGINT) or SIGTERM, quickly and quietly.

Inside `stop_on_signals()` the first of those signals raises `RunInterrupted` in the main
thread, wherever it is (building the task, starting Ray, waiting in the simulation engine),
so the `finally` blocks on the way out stop Ray and remove the run's temp folder. Further
signals are ignored while that happens: a second Ctrl-C neither prints a traceback nor
cuts the clean-up short. Should the clean-up itself hang, a watchdog ends the process after
`grace_s` seconds anyway.

The run folder needs no clean-up of its own: the checkpoint is written atomically after
every round, so the folder is resumable whenever the process stops.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130  # the shell's code for "ended by Ctrl-C"


class RunInterrupted(BaseException):
    """The user stopped the run. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way out (Flower's included) swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_active: list[Callable[[int, object], None]] = []
_watchdogs: list[threading.Timer] = []
_on_stop: list[Callable[[], None]] = []
_received: list[int] = []


def received() -> str:
    """The name of the stop signal being handled ("" before one arrived)."""
    return signal.Signals(_received[-1]).name if _received else ""


@contextmanager
def on_stop(callback: Callable[[], None]) -> Iterator[None]:
    """While inside, run `callback` the moment a stop signal arrives, before the interruption
    unwinds anything (innermost registration first). Stopping from here, rather than from
    `finally` blocks, keeps libraries' own teardown out of the way: Flower's engine shuts Ray
    down while its threads still call Ray, and Ray then ends the process with code 1."""
    _on_stop.append(callback)
    try:
        yield
    finally:
        _on_stop.remove(callback)


@contextmanager
def stop_on_signals(grace_s: float = 8.0) -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into `RunInterrupted`; main thread only."""
    fired = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if fired.is_set():
            return  # already stopping
        fired.set()
        _received.append(signum)
        _start_watchdog(grace_s)
        # Innermost first, like a stack of `finally` blocks; a callback may end the process.
        for callback in reversed(list(_on_stop)):
            callback()
        raise RunInterrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    _active.append(handler)
    try:
        yield
    finally:
        _active.remove(handler)
        if not fired.is_set():
            for sig, old in previous.items():
                signal.signal(sig, old)
        # After a signal the handlers stay: the caller is on its way out and a second
        # Ctrl-C must not interrupt its clean-up.


def rearm() -> None:
    """Put the active handler back after a library replaced it: `ray.init` installs its
    own SIGTERM handlers (Python's `sys.exit`, and a C++ one that aborts the process)."""
    if _active and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _active[-1])


def end_children(grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process below this one (all started by this run: Ray's
    GCS, raylet and workers), so none outlives an interrupted run."""
    pids = _descendants(os.getpid())
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in _descendants(os.getpid()):
        _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except (OSError, IndexError):
        return False


def _start_watchdog(grace_s: float) -> None:
    def expire() -> None:
        # The clean-up hung: end this process's children (Ray's GCS, raylet, workers) by
        # PID, then the process itself, without waiting for anything else.
        for pid in _descendants(os.getpid()):
            _kill(pid, signal.SIGKILL)
        os._exit(EXIT_CODE)

    timer = threading.Timer(grace_s, expire)
    timer.daemon = True
    _watchdogs.append(timer)
    timer.start()


def disarm() -> None:
    """For a process that handled a stop and goes on living (tests): cancel the watchdogs,
    which would otherwise end it `grace_s` seconds after the signal, and forget the signal
    (a run started later in this process would otherwise stop before its first round)."""
    while _watchdogs:
        _watchdogs.pop().cancel()
    _received.clear()


def _descendants(root: int) -> list[int]:
    """Every live process below `root` (Linux /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for pid in entries:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found
