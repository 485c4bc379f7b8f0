"""Validation of the addresses and files a deployment is started with, so that a typo
fails at once with the flag's name instead of as a connection retried forever."""

from __future__ import annotations

from pathlib import Path

from flwr.supercore.address import parse_address


class DeployError(ValueError):
    """A deployment argument that cannot work (bad address, missing file)."""


def check_address(address: str, what: str) -> tuple[str, int]:
    """`address` as (host, port); HOST:PORT without a scheme, IPv6 in brackets."""
    parsed = parse_address(address)
    if parsed is None or not parsed[0] or parsed[1] == 0:
        raise DeployError(f"{what}: {address!r} is not HOST:PORT (e.g. 127.0.0.1:9092 or "
                          "[::1]:9092, no http:// prefix, port 1-65535)")
    return parsed[0], parsed[1]


def check_file(path: str | Path | None, what: str) -> Path:
    if path is None or not Path(path).expanduser().is_file():
        raise DeployError(f"{what}: no such file: {path}")
    return Path(path).expanduser().resolve()
