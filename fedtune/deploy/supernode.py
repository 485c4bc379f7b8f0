"""`flower-supernode` with a short pause between its polls of the SuperLink.

Flower 1.41's SuperNode sleeps a fixed 3 s whenever the SuperLink has no message for it,
and 0.5 s between checks for the ClientApp's reply (`flwr/supernode/start_client_internal.py`,
not configurable). On a trivial round that alone costs 1.5-3 s per round on average. This
entry point caps those pauses at `FEDTUNE_SUPERNODE_POLL_S` (default 0.1 s) and then runs
Flower's own `flower-supernode` with the given arguments, unchanged otherwise:

    python -m fedtune.deploy.supernode --superlink HOST:PORT --root-certificates ca.crt \
        --auth-supernode-private-key node-0 --node-config "partition-id=0" ...

The price is one small Fleet API request per poll (10 a second per node at 0.1 s).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import ModuleType

from fedtune.runtime_settings import runtime_settings

POLL_ENV = "FEDTUNE_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 0.1


class _CappedSleep(ModuleType):
    """The `time` module, except that `sleep` waits at most `cap` seconds."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def poll_interval() -> float:
    try:
        return runtime_settings().supernode_poll_s
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def patch_poll_interval(cap: float) -> None:
    """Cap the SuperNode main loop's sleeps at `cap` seconds (this process only)."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = _CappedSleep(cap)  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> None:
    patch_poll_interval(poll_interval())
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()
