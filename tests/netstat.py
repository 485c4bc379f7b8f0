"""Which sockets a process tree listens on, read from /proc (Linux): the test helper behind
`tests/test_listening.py` and the lifecycle tests. A socket counts as listening when it is a
TCP socket in LISTEN state or a bound UDP socket."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

_LISTEN = {"tcp": "0A", "tcp6": "0A", "udp": "07", "udp6": "07"}


@dataclass(frozen=True)
class Listener:
    pid: int
    command: str
    proto: str
    address: str
    port: int

    @property
    def loopback(self) -> bool:
        ip = ipaddress.ip_address(self.address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback

    def __str__(self) -> str:
        return f"{self.command}[{self.pid}] {self.proto} {self.address}:{self.port}"


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command may hold spaces and parentheses: fields resume after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> set[int]:
    """`root` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (ppid := _ppid(int(entry))) is not None:
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return {p for p in found if Path(f"/proc/{p}").exists()}


def _decode(hex_addr: str) -> tuple[str, int]:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    # /proc prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def _socket_table(pid: int) -> dict[int, tuple[str, str, int]]:
    """inode -> (proto, address, port) of the listening sockets in pid's network namespace."""
    table = {}
    for proto, state in _LISTEN.items():
        try:
            lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state:
                address, port = _decode(fields[1])
                table[int(fields[9])] = (proto, address, port)
    return table


def listeners(pids: set[int]) -> list[Listener]:
    """The listening sockets held open by any of `pids`."""
    found = []
    tables: dict[str, dict[int, tuple[str, str, int]]] = {}
    for pid in sorted(pids):
        try:
            netns = os.readlink(f"/proc/{pid}/ns/net")
            command = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # ended meanwhile
        table = tables.setdefault(netns, _socket_table(pid))
        seen = set()
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in table and inode not in seen:
                    seen.add(inode)
                    found.append(Listener(pid, command, *table[inode]))
    return found


def tree_listeners(root: int) -> list[Listener]:
    return listeners(descendants(root))
