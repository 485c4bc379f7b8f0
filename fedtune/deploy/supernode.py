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

`--tls-client-cert node-0.crt --tls-client-key node-0.key` (taken off the arguments before
Flower sees them) make the SuperNode present its TLS client certificate, which the Fleet
gateway requires (`fedtune.compat.flower_deploy.use_client_certificate`; on an untested
Flower version the SuperNode refuses to start).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable, Sequence

from fedtune.compat.flower_deploy import (
    UnsupportedFlower,
    cap_supernode_polls,
    use_client_certificate,
)
from fedtune.config.runtime import runtime_settings

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


def split_client_cert(argv: Sequence[str]) -> tuple[str | None, str | None, list[str]]:
    """(--tls-client-cert, --tls-client-key, the rest for Flower)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tls-client-cert")
    parser.add_argument("--tls-client-key")
    known, rest = parser.parse_known_args(list(argv))
    if (known.tls_client_cert is None) != (known.tls_client_key is None):
        raise SystemExit("--tls-client-cert and --tls-client-key go together")
    return known.tls_client_cert, known.tls_client_key, rest


def main(argv: Sequence[str] | None = None) -> None:
    cert, key, rest = split_client_cert(sys.argv[1:] if argv is None else argv)
    if cert is not None and key is not None:
        try:
            use_client_certificate(cert, key)
        except UnsupportedFlower as exc:
            raise SystemExit(str(exc)) from None
    cap_supernode_polls(poll_interval())
    flower_supernode = console_script("flower-supernode")
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
