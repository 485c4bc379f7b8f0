"""A quiet console without `--verbose`: what dependencies print goes to the run's log file.

Without it a DP run's console holds Opacus' "Optimal order is the largest alpha" UserWarning,
Flower's "Terminated 2 actors" and "Manually terminating ClientAppActor" notices (DEBUG and
WARNING records of the `flwr` logger, printed by the root handler Opacus installs with
`logging.basicConfig` at import) and `datasets`' progress bars. They are routed, not
silenced: `route_to_log(file)` sends every warning (`logging.captureWarnings`) and every
dependency's log record to `file`; the console keeps fedtune's own records and any ERROR.

Ray's workers are processes of their own whose output Ray copies to the driver's console:
`route_to_log` puts the file's path in the environment (`LOG_ENV`, inherited by the workers
Ray starts afterwards) and `route_from_environment()`, called as the client package is
imported (`clients/__init__.py`, before Opacus is), applies the same routing there.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fedtune.run.atomic import open_append

# The run's log file, for Ray's workers (they inherit the driver's environment).
LOG_ENV = "FEDTUNE_RUN_LOG"
# Loggers whose records stay on the console (fedtune's own packages).
OWN_LOGGERS = ("fedtune", "clients", "strategies", "__main__")
# Read by `datasets` when it is imported: its progress bars are terminal output only.
_QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
_FORMAT = "%(asctime)s pid %(process)d %(name)s %(levelname)s: %(message)s"
# What `route_to_log` changed in this process, for `unroute` (an in-process caller: tests).
_routed: list[tuple[logging.Filterer, logging.Filter | logging.Handler]] = []
_saved: dict[str, object] = {}


def _own(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in OWN_LOGGERS


class _ConsoleFilter(logging.Filter):
    """The console's share: fedtune's own records, and any dependency's ERROR or worse."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Flower's ERRORs reach the console through Flower's own handler.
        return _own(record) or (record.levelno >= logging.ERROR
                                and not record.name.startswith("flwr"))


class _FlowerToLog(logging.Filter):
    """On the `flwr` logger (every Flower record is made there): below ERROR, to the log
    file only (Flower's console handler would print it); ERROR and worse, on as before."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        self.handler.handle(record)
        return False


def route_to_log(log_file: Path) -> None:
    """Route dependencies' warnings and log records of this process to `log_file` (opened
    to append, never through a link), keeping fedtune's own and every ERROR on the
    console; tell processes started later (Ray's workers) to do the same. Once per process
    (`unroute` undoes it)."""
    if _routed:
        return
    handler = logging.StreamHandler(open_append(log_file))
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.DEBUG)
    _saved.update(env={k: os.environ.get(k) for k in (LOG_ENV, *_QUIET_ENV)},
                  flwr_level=logging.getLogger("flwr").level, file=handler)
    os.environ[LOG_ENV] = str(Path(log_file).absolute())
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    root = logging.getLogger()
    # Console handlers already there (a dependency's basicConfig) keep only the console's
    # share; a root with a handler makes a later basicConfig (Opacus' at import) a no-op.
    consoles = [h for h in root.handlers if _is_console(h)]
    for existing in consoles:
        _add(existing, _ConsoleFilter())
    if not consoles:  # fedtune's own warnings still reach the console
        console = logging.StreamHandler(sys.stderr)
        console.addFilter(_ConsoleFilter())
        _add(root, console)
    _add(root, handler)
    flwr = logging.getLogger("flwr")
    _add(flwr, _FlowerToLog(handler))
    # Flower's notices (DEBUG "Terminated 2 actors") are written to the file, not dropped.
    flwr.setLevel(logging.DEBUG)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> root


def unroute() -> None:
    """Undo `route_to_log` in this process (closing the file)."""
    if not _routed:
        return
    logging.captureWarnings(False)
    for owner, item in reversed(_routed):
        if isinstance(item, logging.Handler) and isinstance(owner, logging.Logger):
            owner.removeHandler(item)
        elif isinstance(item, logging.Filter):
            owner.removeFilter(item)
    _routed.clear()
    file_handler = _saved["file"]
    assert isinstance(file_handler, logging.StreamHandler)
    file_handler.stream.close()  # a StreamHandler never closes the stream it was given
    logging.getLogger("flwr").setLevel(_saved["flwr_level"])  # type: ignore[arg-type]
    for key, value in _saved["env"].items():  # type: ignore[union-attr]
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _add(owner: logging.Filterer, item: logging.Filter | logging.Handler) -> None:
    if isinstance(item, logging.Handler):
        assert isinstance(owner, logging.Logger)
        owner.addHandler(item)
    else:
        owner.addFilter(item)
    _routed.append((owner, item))


def route_from_environment() -> None:
    """In a process started by a run (a Ray worker): the run's routing, if it asked for it."""
    log_file = os.environ.get(LOG_ENV)
    if log_file and not _routed:
        try:
            route_to_log(Path(log_file))
        except OSError:  # the folder is gone or not writable here: the console, as before
            pass


def routed() -> bool:
    """True while this process routes dependencies' output to a run's log file."""
    return bool(_routed)


def _is_console(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler)
            and getattr(handler, "stream", None) in (sys.stderr, sys.stdout,
                                                     sys.__stderr__, sys.__stdout__))
