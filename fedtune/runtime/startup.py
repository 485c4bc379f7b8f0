"""Progress lines for a run's start-up: one line per phase, with its duration and the time
since launch.

With a 110 M backbone the start of a run is minutes of imports and loading before the first
round; without these lines it is silence. The driver (`fedtune.sim.driver`, `fedtune.task.task`, the
ServerApp's thread) marks phases with `phase(name)`; they print only while a `StartupReport`
is active (the `fedtune run` command), so library users and tests see nothing.

Seconds are wall-clock: on a loaded machine they include waiting for a core.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PREFIX = "start:"


# When fedtune started in this process: `fedtune.cli` imports this module among its first
# (after typer and rich, a tenth of a second in).
_STARTED = time.time()


def launch_time() -> float:
    """When fedtune started in this process (epoch seconds), so that the CLI's imports count
    too. Not the process's creation time: `bash -c "pip install ... && fedtune run"` hands
    its own process to its last command (exec), whose creation time is then the shell's,
    and every line counted the install too (issue 30)."""
    return _STARTED


@dataclass
class StartupReport:
    """Collects phase durations and hands each finished phase to `emit` as one line."""

    emit: Callable[[str], None]
    launched: float = field(default_factory=launch_time)
    phases: list[tuple[str, float, float]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, name: str, seconds: float, detail: str = "") -> None:
        since = time.time() - self.launched
        with self._lock:
            self.phases.append((name, seconds, since))
        extra = f" ({detail})" if detail else ""
        self.emit(f"{PREFIX} {name} {seconds:.1f} s{extra} · {since:.1f} s since launch")

    def mark(self, name: str, detail: str = "") -> None:
        """A point rather than a phase (e.g. the first round going out)."""
        since = time.time() - self.launched
        with self._lock:
            self.phases.append((name, 0.0, since))
        extra = f" ({detail})" if detail else ""
        self.emit(f"{PREFIX} {name} at {since:.1f} s since launch{extra}")


_ACTIVE: list[StartupReport] = []


@contextmanager
def reporting(report: StartupReport) -> Iterator[StartupReport]:
    """Make `report` receive the phases marked in this process while inside."""
    _ACTIVE.append(report)
    try:
        yield report
    finally:
        _ACTIVE.remove(report)


def active() -> StartupReport | None:
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def phase(name: str, detail: str | Callable[[], str] = "") -> Iterator[None]:
    """Time the enclosed block as start-up phase `name` (a no-op without an active report).
    `detail` may be a callable, evaluated after the block (e.g. a count it produced). A
    phase that raises is not reported: the error says what went wrong."""
    report = active()
    if report is None:
        yield
        return
    t0 = time.perf_counter()
    yield
    report.record(name, time.perf_counter() - t0, detail() if callable(detail) else detail)


def mark(name: str, detail: str = "") -> None:
    report = active()
    if report is not None:
        report.mark(name, detail)


def record_since(name: str, started: float, detail: str | Callable[[], str] = "") -> None:
    """Report phase `name` as running from `started` (a `time.perf_counter()` value) to now;
    for blocks that cannot be wrapped in `phase`."""
    report = active()
    if report is not None:
        report.record(name, time.perf_counter() - started,
                      detail() if callable(detail) else detail)
