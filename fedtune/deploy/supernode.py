"""`flower-supernode` with a short pause between its polls of the SuperLink.

Flower's SuperNode (1.41, 1.42) sleeps a fixed 3 s whenever the SuperLink has no message for
it, and 0.5 s between checks for the ClientApp's reply (not configurable). On a trivial round
that alone costs 1.5-3 s per round on average. This entry point caps those pauses at
`FEDTUNE_SUPERNODE_POLL_S` (default 0.1 s; `fedtune.compat.flower_deploy`, which leaves an
untested Flower version alone and says so) and then runs Flower's own `flower-supernode`
with the given arguments, unchanged otherwise:

    python -m fedtune.deploy.supernode --superlink HOST:PORT --root-certificates ca.crt \
        --auth-supernode-private-key node-0 --node-config "partition-id=0" ...

The price is one small Fleet API request per poll (10 a second per node at 0.1 s).
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable, Sequence

from fedtune.compat.flower_deploy import cap_supernode_polls
from fedtune.runtime_settings import runtime_settings

POLL_ENV = "FEDTUNE_SUPERNODE_POLL_S"


def poll_interval() -> float:
    try:
        return runtime_settings().supernode_poll_s
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def console_script(name: str) -> Callable[[], None]:
    """The function behind one of Flower's declared console scripts (its public entry
    point, wherever the installed version keeps it)."""
    entries = list(importlib.metadata.entry_points(group="console_scripts", name=name))
    if len(entries) != 1:
        raise SystemExit(f"{len(entries)} console scripts named {name!r} are installed "
                         "(expected Flower's one): reinstall flwr")
    return entries[0].load()


def main(argv: Sequence[str] | None = None) -> None:
    cap_supernode_polls(poll_interval())
    flower_supernode = console_script("flower-supernode")
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()
