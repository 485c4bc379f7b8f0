"""Validation of the addresses and files a deployment is started with, so that a typo
fails at once with the flag's name instead of as a connection retried forever."""

from __future__ import annotations

from pathlib import Path

from fedtune.config.checks import ascii_digits
from fedtune.config.errors import DeployError


def check_address(address: str, what: str) -> tuple[str, int]:
    """`address` as (host, port); HOST:PORT without a scheme, IPv6 in brackets."""
    parsed = _host_port(address)
    if parsed is None:
        raise DeployError(f"{what}: {address!r} is not HOST:PORT (e.g. 127.0.0.1:9092 or "
                          "[::1]:9092, no http:// prefix, port 1-65535)")
    return parsed


def _host_port(address: str) -> tuple[str, int] | None:
    """HOST:PORT or [IPv6]:PORT, as (host without brackets, port); None for anything else."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not ascii_digits(port) or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        return (host, int(port)) if ":" in host and "/" not in host else None
    if not host or ":" in host or "/" in host or " " in host:
        return None
    return host, int(port)


def check_file(path: str | Path | None, what: str) -> Path:
    if path is None or not Path(path).expanduser().is_file():
        raise DeployError(f"{what}: no such file: {path}")
    return Path(path).expanduser().resolve()
