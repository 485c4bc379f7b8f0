"""Validation of the addresses and files a deployment is started with, so that a typo
fails at once with the flag's name instead of as a connection retried forever."""

from __future__ import annotations

from pathlib import Path


class DeployError(ValueError):
    """A deployment argument that cannot work (bad address, missing file)."""


def check_address(address: str, what: str) -> tuple[str, int]:
    """`address` as (host, port); HOST:PORT without a scheme, IPv6 in brackets."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:9092, as Flower accepts it
    number = int(port) if port.isascii() and port.isdigit() else 0
    if "://" in address or not host or not 0 < number < 65536:
        raise DeployError(f"{what}: {address!r} is not HOST:PORT (e.g. 127.0.0.1:9092 or "
                          "[::1]:9092, no http:// prefix, port 1-65535)")
    return host, number


def check_file(path: str | Path | None, what: str) -> Path:
    if path is None or not Path(path).expanduser().is_file():
        raise DeployError(f"{what}: no such file: {path}")
    return Path(path).expanduser().resolve()
