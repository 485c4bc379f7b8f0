"""The only part of a deployment that faces the network: a TLS gateway to the Fleet API.

Flower 1.41's SuperLink serves the Fleet API (what SuperNodes use), the Control API (register
node keys, submit and stop runs) and the ServerAppIo/Runtime API on ONE HTTPS port
(`--host`/`--port`; the per-API address flags are deprecated and ignored), and the open-source
Control API has no account authentication. A SuperLink on `--host 0.0.0.0` therefore let an
outsider holding only `ca.crt` register its own node key and join (measured on main).

So the SuperLink listens on 127.0.0.1 only, and this gateway listens where SuperNodes can
reach it. It terminates TLS with the SuperLink's certificate, forwards exactly the Fleet
API's routes (`POST /v1/fleet/<name>`, names below) to the SuperLink over TLS on loopback,
and answers everything else with 404 without contacting the SuperLink. Node authentication
is untouched: the SuperLink checks each request's signature and the registered key as before
(the signed headers pass through unchanged).

What an outsider meets, in order (THREATS.md 6; issue 27 #5, #6):
1. client-certificate TLS: the handshake needs a certificate signed by `ca.crt` for client
   use (`fedtune deploy certs` issues `node-<i>.crt`); without one nothing is parsed, and
   Flower's node-auth headers (a signed timestamp, replayable for minutes) replayed by an
   outsider fail here;
2. connections per peer address (`--max-connections-per-peer`, extra ones are closed at
   once) and requests per second per peer (`--max-requests-per-s`, then 429);
3. a request body limit (`--max-body-bytes`): a larger Content-Length gets 413 before one
   byte of the body is read, and a body without one is counted while it streams and cut
   off with 413 at the limit, so the gateway never holds more than the limit per request.

    python -m fedtune.deploy.fleet_gateway --listen 0.0.0.0:9092 \
        --superlink 127.0.0.1:9093 --ssl-certfile server.pem --ssl-keyfile server.key \
        --ssl-ca-certfile ca.crt [--max-body-bytes N]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedtune.deploy.address import DeployError, check_address, check_file

# The Fleet API of Flower 1.41 (`flwr/superlink/routers/fleet/router.py`; the SuperNode's
# `fleet_http_client` calls exactly these). A route Flower adds later stays closed until it
# is listed here: the gateway fails closed.
FLEET_ROUTES = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"})
# Headers that describe one connection, not the request (RFC 9110 7.6.1), and the ones
# httpx sets itself for the upstream request.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate",
                         "proxy-authorization", "te", "trailer", "transfer-encoding",
                         "upgrade", "host", "content-length"})
# httpx hands back the decoded body: its length and encoding are recomputed.
_NOT_FORWARDED_BACK = _HOP_BY_HOP | {"content-encoding"}
UPSTREAM_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Limits:
    """What one peer may use. The body limit is the largest legitimate Fleet request with a
    margin: a SuperNode's largest upload is its reply's arrays (4 bytes per trainable
    parameter in float32; `body_limit_for`), far below the default for the bundled
    backbones. A SuperNode polls ~10 times a second at 0.1 s (`supernode_poll_s`) and
    keeps a few connections; `deploy local` runs every node from 127.0.0.1 and scales the
    per-peer figures by its node count."""

    max_body_bytes: int = 32 * 2**20
    max_connections_per_peer: int = 8
    max_requests_per_s: float = 50.0
    burst: int = 200

    def scaled(self, peers: int) -> Limits:
        """The same limits for `peers` clients behind one address."""
        return Limits(self.max_body_bytes, self.max_connections_per_peer * peers,
                      self.max_requests_per_s * peers, self.burst * peers)


def body_limit_for(trainable_params: int, margin: float = 2.0, overhead: int = 2**20
                   ) -> int:
    """A body limit for a model with `trainable_params` federated values: their float32
    bytes times `margin`, plus `overhead` for the message's other records and framing."""
    return int(trainable_params * 4 * margin) + overhead


@dataclass
class _Buckets:
    """Token buckets per peer address: `rate` requests a second, at most `burst` at once."""

    rate: float
    burst: int
    state: dict[str, tuple[float, float]] = field(default_factory=dict)

    def take(self, peer: str) -> bool:
        now = time.monotonic()
        tokens, last = self.state.get(peer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if len(self.state) > 100_000:  # bounded: forget full buckets first
            self.state = {p: v for p, v in self.state.items() if v[0] < self.burst}
        if tokens < 1.0:
            self.state[peer] = (tokens, now)
            return False
        self.state[peer] = (tokens - 1.0, now)
        return True


class BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> Response:
    # `Connection: close`: the unread rest of the body is never read; the connection ends.
    return PlainTextResponse(f"request body over the gateway's limit of {limit} bytes\n",
                             status_code=413, headers={"connection": "close"})


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (BodyTooLarge) as soon as its declared or streamed size passes
    `limit`: at most `limit` bytes are ever held."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def build_app(superlink: str, ca_certfile: str, limits: Limits = Limits()) -> Starlette:
    """The gateway's ASGI app, forwarding Fleet routes to `superlink` (HOST:PORT)."""
    verify = ssl.create_default_context(cafile=ca_certfile)
    client: httpx.AsyncClient | None = None
    buckets = _Buckets(limits.max_requests_per_s, limits.burst)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        nonlocal client
        async with httpx.AsyncClient(base_url=f"https://{superlink}", verify=verify,
                                     timeout=UPSTREAM_TIMEOUT_S) as client:
            yield

    async def forward(request: Request) -> Response:
        peer = request.client.host if request.client else "?"
        if not buckets.take(peer):
            return PlainTextResponse("too many requests from this address\n",
                                     status_code=429, headers={"retry-after": "1"})
        name = request.path_params["name"]
        if name not in FLEET_ROUTES:
            return PlainTextResponse("not a Fleet API route\n", status_code=404)
        try:
            body = await read_body(request, limits.max_body_bytes)
        except BodyTooLarge:
            return _too_large(limits.max_body_bytes)
        except ClientDisconnect:
            return PlainTextResponse("client went away\n", status_code=400)
        assert client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream = await client.post(f"/v1/fleet/{name}", content=body,
                                         headers=headers, params=request.query_params)
        except httpx.TransportError:
            return PlainTextResponse("SuperLink unreachable\n", status_code=502)
        back = {k: v for k, v in upstream.headers.items()
                if k.lower() not in _NOT_FORWARDED_BACK}
        return Response(upstream.content, status_code=upstream.status_code, headers=back)

    async def refuse(request: Request) -> Response:
        return PlainTextResponse("not a Fleet API route\n", status_code=404,
                                 headers={"connection": "close"})

    return Starlette(lifespan=lifespan, routes=[
        Route("/v1/fleet/{name}", forward, methods=["POST"]),
        Route("/{path:path}", refuse, methods=["GET", "POST", "PUT", "PATCH", "DELETE",
                                               "HEAD", "OPTIONS"]),
    ])


def peer_limited_protocol(max_per_peer: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a peer's connection beyond `max_per_peer` open ones
    at once (after the TLS handshake, before any byte of HTTP is parsed)."""
    open_by_peer: Counter[str] = Counter()

    class PeerLimited(H11Protocol):
        _peer: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = str((transport.get_extra_info("peername") or ("?",))[0])
            if open_by_peer[peer] >= max_per_peer:
                transport.abort()
                return
            open_by_peer[peer] += 1
            self._peer = peer
            super().connection_made(transport)

        def on_response_complete(self) -> None:
            # A response that closes the connection while the peer is still sending its
            # body (413): abort, so the rest is neither read nor drained during TLS's
            # graceful shutdown (which kept reading an unwanted body).
            if self.transport.is_closing() and self.conn.their_state is not h11.DONE:
                self.transport.abort()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._peer is None:
                return  # refused in connection_made: uvicorn never saw it
            open_by_peer[self._peer] -= 1
            if open_by_peer[self._peer] <= 0:
                del open_by_peer[self._peer]
            self._peer = None
            super().connection_lost(exc)

    return PeerLimited


def serve(listen: str, superlink: str, certfile: str, keyfile: str, ca_certfile: str,
          limits: Limits = Limits()) -> None:
    host, port = check_address(listen, "--listen")
    up_host, _ = check_address(superlink, "--superlink")
    if up_host not in ("127.0.0.1", "localhost", "::1"):
        raise DeployError(f"--superlink: {superlink!r} must be a loopback address: the "
                          "SuperLink itself never faces the network")
    for path, what in ((certfile, "--ssl-certfile"), (keyfile, "--ssl-keyfile"),
                       (ca_certfile, "--ssl-ca-certfile")):
        check_file(path, what)
    # CERT_REQUIRED: a client without a certificate signed by the CA (for client use) is
    # refused in the TLS handshake.
    uvicorn.run(build_app(superlink, ca_certfile, limits), host=host, port=port,
                ssl_certfile=certfile, ssl_keyfile=keyfile, ssl_ca_certs=ca_certfile,
                ssl_cert_reqs=ssl.CERT_REQUIRED,
                http=peer_limited_protocol(limits.max_connections_per_peer),
                h11_max_incomplete_event_size=64 * 1024, timeout_keep_alive=15,
                limit_concurrency=4096, log_level="warning", access_log=False)


def _positive_int(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 2**40:
        raise argparse.ArgumentTypeError(f"must be in [1, {2**40}], got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1e6:
        raise argparse.ArgumentTypeError(f"must be in (0, 1e6], got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="TLS gateway exposing only a loopback SuperLink's Fleet API")
    parser.add_argument("--listen", required=True,
                        help="where SuperNodes connect, HOST:PORT (e.g. 0.0.0.0:9092)")
    parser.add_argument("--superlink", required=True,
                        help="the SuperLink's loopback address, 127.0.0.1:PORT")
    parser.add_argument("--ssl-certfile", required=True, help="server.pem")
    parser.add_argument("--ssl-keyfile", required=True, help="server.key")
    parser.add_argument("--ssl-ca-certfile", required=True,
                        help="ca.crt (verifies the SuperLink and every node's certificate)")
    default = Limits()
    parser.add_argument("--max-body-bytes", type=_positive_int,
                        default=default.max_body_bytes, help="largest request body")
    parser.add_argument("--max-connections-per-peer", type=_positive_int,
                        default=default.max_connections_per_peer)
    parser.add_argument("--max-requests-per-s", type=_positive_float,
                        default=default.max_requests_per_s, help="per peer address")
    parser.add_argument("--burst", type=_positive_int, default=default.burst,
                        help="requests a peer may send at once before the rate applies")
    args = parser.parse_args(argv)
    limits = Limits(args.max_body_bytes, args.max_connections_per_peer,
                    args.max_requests_per_s, args.burst)
    try:
        serve(args.listen, args.superlink, args.ssl_certfile, args.ssl_keyfile,
              args.ssl_ca_certfile, limits)
    except DeployError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
