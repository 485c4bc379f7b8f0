"""What fedtune's simulation needs from Flower that Flower has no public API for, in one place,
applied only on the Flower versions it was tested on.

1. **Fast message hand-out** (`install_fast_dispatch`). Flower's simulation engine hands
   messages to the Ray actors from `vce_api.add_messages_to_queue`: every 0.1 s it asks the
   in-memory LinkState once per node, and each ask scans and validates every stored message,
   i.e. nodes x messages checks per tick. With 1,000 virtual clients discovery (one message
   to every node) took minutes (benchmarks/RESULTS.md, "Simulation at scale";
   `benchmarks/sim_overhead.py --discovery N` measures it with and without this patch).
   `dispatch_messages` does the same with one scan per tick. It reads the in-memory
   LinkState's lock, message store and expiry check, none of them public, and Flower gives no
   hook to replace the loop, so the patch is applied only on `TESTED_VERSIONS` and on the
   state class it was written for; anywhere else Flower's own loop runs (slower with many
   clients, same results) and an info line says so once.

2. **In-process simulation** (`run_inprocess`). `flwr.simulation.run_simulation` is the only
   way, in Flower 1.41 and 1.42 alike, to run a ServerApp and a ClientApp *objects* in this
   process on the Ray backend; it logs a deprecation notice pointing at `flwr run`. The
   replacement `flwr run` needs a SuperLink started with `--simulation`, which runs the apps
   in a separate `flwr-simulation` process loaded from module attributes: fedtune's in-process
   features (the ServerApp's on-round callback, stop on Ctrl-C/SIGTERM with its clean-up,
   the loopback-only Ray that fedtune starts, the run-folder lock) would have to cross a
   process boundary. `flwr.simulation.run_simulation_process` is the worker such a SuperLink
   launches, not an in-process API. So the deprecated call stays, here, with its notice
   filtered; on a Flower without it `run_inprocess` fails with one line saying so.
"""

from __future__ import annotations

import datetime
import logging
import threading
from importlib.metadata import PackageNotFoundError, version
from queue import Queue
from typing import Any

log = logging.getLogger(__name__)

# Flower minor versions on which `dispatch_messages` was checked against the engine's
# source (vce_api, InMemoryLinkState: identical in 1.41.0 and 1.42.0) and run end to end.
TESTED_VERSIONS = frozenset({"1.41", "1.42"})

# How often the hand-out looks for new messages (Flower: 0.1 s). One scan of the store is
# cheap, and a shorter tick cuts the wait before an actor gets its message.
DISPATCH_TICK_S = 0.02

# The LinkState members `dispatch_messages` reads; checked on the live object too.
_STATE_MEMBERS = ("lock", "message_ins_store", "_check_stored_messages")

_fallback_logged: list[str] = []


def flower_version() -> str:
    """The installed Flower's version ("" when it is not installed)."""
    try:
        return version("flwr")
    except PackageNotFoundError:
        return ""


def is_tested(flwr_version: str) -> bool:
    """Whether `flwr_version`'s major.minor is one the patches were tested on."""
    return ".".join(flwr_version.split(".")[:2]) in TESTED_VERSIONS


def dispatch_messages(state: Any, queue: Queue, nodes_mapping: dict[int, int],
                      f_stop: threading.Event) -> None:
    """Drop-in for Flower's `vce_api.add_messages_to_queue` (same arguments, same result:
    each tick, at most one undelivered message per node is marked delivered and queued for
    the actors), scanning the store once per tick instead of once per node, with Flower's
    own expiry check, under the state's lock."""
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        with state.lock:
            ids = list(state.message_ins_store)
            state._check_stored_messages(set(ids))  # drops expired / out-of-federation ones
            batch, served = [], set()
            for msg_id in ids:
                msg = state.message_ins_store.get(msg_id)
                if msg is None or msg.metadata.delivered_at != "":
                    continue
                node = msg.metadata.dst_node_id
                if node in nodes and node not in served:
                    served.add(node)
                    batch.append(msg)
            # What Flower's `get_message_ins` writes: an ISO timestamp in UTC.
            delivered_at = datetime.datetime.now(tz=datetime.UTC).isoformat()
            for msg in batch:
                msg.metadata.delivered_at = delivered_at
        for msg in batch:
            queue.put(msg)
        f_stop.wait(DISPATCH_TICK_S)


def _log_fallback(reason: str) -> None:
    if reason not in _fallback_logged:
        _fallback_logged.append(reason)
        log.info("%s; the simulation uses Flower's own message hand-out (same results, "
                 "slower with many virtual clients)", reason)


def install_fast_dispatch(flwr_version: str | None = None) -> bool:
    """Use `dispatch_messages` in Flower's simulation engine if the installed Flower is
    one it was tested on; returns whether it is in place. Idempotent; `uninstall_fast_dispatch`
    undoes it. `flwr_version` overrides the installed version (tests)."""
    flwr_version = flower_version() if flwr_version is None else flwr_version
    if not is_tested(flwr_version):
        _log_fallback(f"Flower {flwr_version or '(not installed)'} is not a version fedtune's "
                      f"fast message hand-out was tested on ({', '.join(sorted(TESTED_VERSIONS))})")
        uninstall_fast_dispatch()
        return False
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    except ImportError as err:
        _log_fallback(f"Flower {flwr_version} has no simulation engine where expected ({err})")
        return False
    original = getattr(vce_api, "_fedtune_original_dispatch", None)
    if original is None:
        original = getattr(vce_api, "add_messages_to_queue", None)
        if original is None:
            _log_fallback(f"Flower {flwr_version} has no vce_api.add_messages_to_queue")
            return False
        vce_api._fedtune_original_dispatch = original

    def dispatch(state: Any, queue: Queue, nodes_mapping: dict[int, int],
                 f_stop: threading.Event) -> None:
        # Only the state class the patch was written for, with the members it reads.
        if isinstance(state, InMemoryLinkState) and all(hasattr(state, a)
                                                        for a in _STATE_MEMBERS):
            dispatch_messages(state, queue, nodes_mapping, f_stop)
        else:
            _log_fallback(f"the engine's LinkState ({type(state).__name__}) is not the "
                          "in-memory one fedtune's hand-out was written for")
            original(state, queue, nodes_mapping, f_stop)

    dispatch._fedtune_fast = True  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = dispatch
    return True


def uninstall_fast_dispatch() -> None:
    """Put Flower's own hand-out back (no-op when it was never replaced)."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return
    original = getattr(vce_api, "_fedtune_original_dispatch", None)
    if original is not None:
        vce_api.add_messages_to_queue = original
        del vce_api._fedtune_original_dispatch


def fast_dispatch_installed() -> bool:
    """Whether the engine currently uses `dispatch_messages`."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    return getattr(vce_api.add_messages_to_queue, "_fedtune_fast", False)


class _DropRunSimulationNotice(logging.Filter):
    """Flower logs "DEPRECATED FEATURE: The `run_simulation` function is deprecated ..." on
    every call; fedtune calls it knowingly (module docstring), so the notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("DEPRECATED FEATURE" in str(record.msg)
                    and "run_simulation" in record.getMessage())


def run_inprocess(server_app: Any, client_app: Any, num_supernodes: int,
                  backend_config: dict[str, Any], verbose: bool = False) -> None:
    """Run `server_app` against `num_supernodes` virtual clients running `client_app` on
    the Ray backend, in this process (see the module docstring for why this is Flower's
    deprecated `run_simulation`)."""
    import flwr.simulation

    # Not `from ... import`: that would find the submodule of the same name when the
    # function is gone.
    run_simulation = getattr(flwr.simulation, "run_simulation", None)
    if not callable(run_simulation):
        raise RuntimeError(f"Flower {flower_version()} has no flwr.simulation.run_simulation, "
                           "the in-process simulation fedtune runs on; install a Flower "
                           "version fedtune supports (see pyproject.toml)")
    flwr_logger = logging.getLogger("flwr")
    notice_filter = _DropRunSimulationNotice()
    flwr_logger.addFilter(notice_filter)
    try:
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=num_supernodes, backend_config=backend_config,
                       verbose_logging=verbose)
    finally:
        flwr_logger.removeFilter(notice_filter)
