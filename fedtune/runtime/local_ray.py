"""Keep the Ray runtime of a local simulation on loopback, with its files in a temp folder.

Measured with Ray 2.55 on Linux: a plain `ray.init()` gives the node the host's address, and
the GCS, raylet, every worker and the driver then listen on all interfaces (`[::]`; the
runtime-env agent on the host's address), with Ray's authentication off. Ray binds its
servers to the node's address; that address is loopback only when Ray runs in its
single-machine mode, chosen by `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (Ray's switch for
"this node never joins a cluster", the default on Windows and macOS). Ray reads the switch
once, when it is first imported, so `loopback_ray` sets it before that and then asks Ray
(public `ray.util.get_node_ip_address`) which address a new node would get: anything but
loopback is refused before Ray starts (fail closed), for instance when this process
imported Ray earlier. `tests/test_listening.py` measures the result on a real run.

`RAY_TMPDIR` points Ray's session folder (logs, sockets, spilled objects) into the run's
temp folder, which the caller removes afterwards, instead of leaving it under /tmp/ray.

Not for `simulation.ray_address`: a cluster's nodes must reach each other.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
TMPDIR_ENV = "RAY_TMPDIR"


class RayNotLoopbackError(RuntimeError):
    """Ray would give a local simulation a network-facing address."""


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address == "localhost"


def prefer_loopback() -> None:
    """Ask Ray for its single-machine mode; effective only before Ray is first imported."""
    os.environ[SINGLE_MACHINE_ENV] = "0"


@contextmanager
def loopback_ray(temp_dir: Path) -> Iterator[None]:
    """While inside, a Ray started by this process listens on loopback only (or is refused
    before it starts) and keeps its files under `temp_dir`. `RAY_TMPDIR` is restored on the
    way out; the single-machine switch stays, as Ray has read it."""
    prefer_loopback()
    saved = os.environ.get(TMPDIR_ENV)
    os.environ[TMPDIR_ENV] = str(temp_dir)
    try:
        check_node_address()
        yield
    finally:
        if saved is None:
            os.environ.pop(TMPDIR_ENV, None)
        else:
            os.environ[TMPDIR_ENV] = saved


def check_node_address() -> None:
    """Refuse to start Ray when the node it would start is not on loopback."""
    import ray
    import ray.util

    if ray.is_initialized():
        raise RayNotLoopbackError(
            "Ray is already running in this process; a local simulation starts its own "
            "Ray on loopback (use simulation.ray_address for an existing cluster)")
    address = ray.util.get_node_ip_address()
    if not is_loopback(address):
        raise RayNotLoopbackError(
            f"Ray would listen on {address}, not on loopback: it was imported before "
            f"{SINGLE_MACHINE_ENV}=0 could take effect; run the simulation in a fresh "
            "process (the `fedtune run` command does)")


def check_started() -> None:
    """After `ray.init`: the node Ray started listens on loopback, or the run stops here,
    before any actor or client data exists."""
    import ray.util

    address = ray.util.get_node_ip_address()
    if not is_loopback(address):
        raise RayNotLoopbackError(f"the local Ray node started on {address}, not on "
                                  "loopback; refusing to run the simulation on it")
