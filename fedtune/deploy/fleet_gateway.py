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
2. connections per peer address (`--max-connections-per-peer`), counted at accept, before
   the handshake: extra ones are closed at once, and a handshake gets
   `--handshake-timeout-s` (5 s), so a peer without a certificate holds at most its limit
   for at most that long; a certified peer gets `--header-timeout-s` (10 s) for each
   request's headers (slowloris); then requests per second per peer
   (`--max-requests-per-s`, then 429);
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
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedtune.config.checks import ascii_digits
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
# An outsider's half-done handshake holds one of its peer's connections this long at most
# (asyncio's default is 60 s); a certified peer has this long to send a request's headers.
HANDSHAKE_TIMEOUT_S = 5.0
HEADER_TIMEOUT_S = 10.0
# What may arrive between the end of a handshake and the hand-over to HTTP (one TLS read).
EARLY_DATA_LIMIT = 1 << 20


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
    if declared is not None and (not ascii_digits(declared) or int(declared) > limit):
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


def server_tls_context(certfile: str, keyfile: str, ca_certfile: str) -> ssl.SSLContext:
    """The gateway's TLS: its certificate, and CERT_REQUIRED: a client without a certificate
    signed by the CA (for client use) is refused in the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=ca_certfile)
    return context


def peer_limited_protocol(max_per_peer: int, tls: ssl.SSLContext,
                          handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                          header_timeout_s: float = HEADER_TIMEOUT_S) -> type[asyncio.Protocol]:
    """The protocol uvicorn runs for each accepted TCP connection (uvicorn itself is given no
    TLS settings). A peer's connection beyond `max_per_peer` open ones is aborted at accept,
    before a byte of TLS is read: counting only after the handshake let an outsider without a
    certificate hold any number of half-done handshakes (asyncio waits 60 s by default). The
    handshake (`loop.start_tls`) gets `handshake_timeout_s`, and a certified peer
    `header_timeout_s` to send each request's headers (slowloris)."""
    open_by_peer: Counter[str] = Counter()

    def releaser(peer: str) -> Callable[[], None]:
        done = False

        def release() -> None:  # once per connection, whichever protocol sees it end
            nonlocal done
            if done:
                return
            done = True
            open_by_peer[peer] -= 1
            if open_by_peer[peer] <= 0:
                del open_by_peer[peer]
        return release

    class Http(H11Protocol):
        """uvicorn's h11 protocol on a connection whose TLS handshake has finished."""

        release: Callable[[], None] = staticmethod(lambda: None)
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Headers still incomplete: the clock runs from the first byte of this request.
            if self.conn.their_state is h11.IDLE:
                self._arm()
            else:
                self._disarm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.abort()

        def on_response_complete(self) -> None:
            # A response that closes the connection while the peer is still sending its
            # body (413): abort, so the rest is neither read nor drained during TLS's
            # graceful shutdown (which kept reading an unwanted body).
            if self.transport.is_closing() and self.conn.their_state is not h11.DONE:
                self.transport.abort()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self.release()
            super().connection_lost(exc)

    class PeerLimited(asyncio.Protocol):
        """Counts the peer at accept, runs the TLS handshake, then hands over to Http. What
        arrives between the handshake's end and the hand-over (asyncio delivers it at once)
        is kept and passed on."""

        def __init__(self, config: Any, server_state: Any, app_state: Any,
                     _loop: asyncio.AbstractEventLoop | None = None) -> None:
            self._args = (config, server_state, app_state)
            self._loop = _loop or asyncio.get_event_loop()
            self._release: Callable[[], None] = lambda: None
            self._http: Http | None = None
            self._early = bytearray()
            self._eof = self._lost = self._started = False
            self._raw: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            # (uvloop's transports are not asyncio.Transport subclasses, but behave as one)
            peer = str((transport.get_extra_info("peername") or ("?",))[0])
            if open_by_peer[peer] >= max_per_peer:
                transport.abort()
                return
            open_by_peer[peer] += 1
            self._release = releaser(peer)
            self._raw = transport
            transport.pause_reading()  # start_tls reads the ClientHello
            self._loop.create_task(self._handshake(transport))

        async def _handshake(self, raw: asyncio.Transport) -> None:
            self._started = True
            try:
                wrapped = await self._loop.start_tls(
                    raw, self, tls, server_side=True,
                    ssl_handshake_timeout=handshake_timeout_s)
            except Exception:  # refused, timed out or gone: asyncio logs the TLS error
                raw.abort()
                self._release()
                return
            if self._lost or wrapped is None:  # None: the peer closed during the handshake
                raw.abort()
                self._release()
                return
            config, server_state, app_state = self._args
            http = Http(config=config, server_state=server_state, app_state=app_state,
                        _loop=self._loop)
            http.release = self._release
            self._http = http
            wrapped.set_protocol(http)
            http.connection_made(wrapped)  # type: ignore[arg-type]
            if self._early:
                http.data_received(bytes(self._early))
                self._early.clear()
            if self._eof:
                http.eof_received()

        def data_received(self, data: bytes) -> None:
            if self._http is not None:
                self._http.data_received(data)
                return
            if not self._started:  # raw TLS bytes past pause_reading: fail closed
                assert self._raw is not None
                self._raw.abort()
                return
            self._early += data
            if len(self._early) > EARLY_DATA_LIMIT:
                assert self._raw is not None
                self._raw.abort()

        def eof_received(self) -> None:
            if self._http is not None:
                self._http.eof_received()
            else:
                self._eof = True

        def connection_lost(self, exc: Exception | None) -> None:
            if self._http is not None:
                self._http.connection_lost(exc)
            else:
                self._lost = True
                self._release()

    return PeerLimited


def serve(listen: str, superlink: str, certfile: str, keyfile: str, ca_certfile: str,
          limits: Limits = Limits(), handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
          header_timeout_s: float = HEADER_TIMEOUT_S) -> None:
    host, port = check_address(listen, "--listen")
    up_host, _ = check_address(superlink, "--superlink")
    if up_host not in ("127.0.0.1", "localhost", "::1"):
        raise DeployError(f"--superlink: {superlink!r} must be a loopback address: the "
                          "SuperLink itself never faces the network")
    for path, what in ((certfile, "--ssl-certfile"), (keyfile, "--ssl-keyfile"),
                       (ca_certfile, "--ssl-ca-certfile")):
        check_file(path, what)
    # TLS is run by the protocol (peer_limited_protocol), so that a peer is counted and
    # limited at accept, before its handshake.
    tls = server_tls_context(certfile, keyfile, ca_certfile)
    uvicorn.run(build_app(superlink, ca_certfile, limits), host=host, port=port,
                http=peer_limited_protocol(limits.max_connections_per_peer, tls,
                                           handshake_timeout_s, header_timeout_s),
                h11_max_incomplete_event_size=64 * 1024, timeout_keep_alive=15,
                limit_concurrency=4096, log_level="warning", access_log=False,
                # asyncio's loop: uvloop starts reading a new connection after
                # connection_made even when it paused reading, so the ClientHello missed
                # start_tls and handshakes stalled (measured: 13 of 20 hit the timeout).
                loop="asyncio")


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


def _timeout(text: str) -> float:
    value = float(text)
    if not 0.1 <= value <= 300:
        raise argparse.ArgumentTypeError(f"must be in [0.1, 300] seconds, got {value}")
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
    parser.add_argument("--handshake-timeout-s", type=_timeout, default=HANDSHAKE_TIMEOUT_S,
                        help="longest TLS handshake (an unfinished one holds a connection)")
    parser.add_argument("--header-timeout-s", type=_timeout, default=HEADER_TIMEOUT_S,
                        help="longest wait for a request's headers (slowloris)")
    args = parser.parse_args(argv)
    limits = Limits(args.max_body_bytes, args.max_connections_per_peer,
                    args.max_requests_per_s, args.burst)
    try:
        serve(args.listen, args.superlink, args.ssl_certfile, args.ssl_keyfile,
              args.ssl_ca_certfile, limits, args.handshake_timeout_s, args.header_timeout_s)
    except DeployError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
