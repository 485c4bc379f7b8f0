"""Ray's worker set-up hook for simulations (`fedtune.sim.driver.start_ray`): a worker imports
the ClientApp's modules (torch, transformers, the client code) when its process starts.

Flower creates its actors when the simulation starts, but they would import all this only
on their first message, which waits for the driver's task; as a set-up hook the imports
run while the driver is still building it.
"""

from __future__ import annotations


def import_client() -> None:
    """Import `clients.handlers`. A failure is left to the first message, which reports it with
    the ClientApp's own error handling; a set-up hook that raises would fail the worker
    with Ray's message instead."""
    try:
        import clients.handlers  # noqa: F401
    except Exception:  # noqa: BLE001 (see the docstring)
        pass
