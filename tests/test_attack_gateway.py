"""Attack (THREATS.md class 6): an outsider without a node certificate cannot hold the
gateway's connections open."""

import socket
import time

from tests.test_gateway import gateway  # noqa: F401 (the fixture: per-peer limit 4)

PEER_LIMIT = 4


def _still_open(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


def test_an_outsider_cannot_hold_more_connections_than_the_per_peer_limit(gateway):  # noqa: F811
    """Connections that never finish the TLS handshake count against the per-peer limit."""
    port, _, _ = gateway
    held = []
    try:
        for _ in range(10 * PEER_LIMIT):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then silence
            held.append(sock)
        time.sleep(3.0)
        still = sum(_still_open(s) for s in held)
        assert still <= PEER_LIMIT, (
            f"{still} handshake-less connections from one address still held after 3 s "
            f"(per-peer limit {PEER_LIMIT})")
    finally:
        for sock in held:
            sock.close()
