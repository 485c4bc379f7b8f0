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

    python -m fedtune.deploy.fleet_gateway --listen 0.0.0.0:9092 \
        --superlink 127.0.0.1:9093 --ssl-certfile server.pem --ssl-keyfile server.key \
        --ssl-ca-certfile ca.crt
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Sequence
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

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


def build_app(superlink: str, ca_certfile: str) -> Starlette:
    """The gateway's ASGI app, forwarding Fleet routes to `superlink` (HOST:PORT)."""
    verify = ssl.create_default_context(cafile=ca_certfile)
    client: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def lifespan(app: Starlette):
        nonlocal client
        async with httpx.AsyncClient(base_url=f"https://{superlink}", verify=verify,
                                     timeout=UPSTREAM_TIMEOUT_S) as client:
            yield

    async def forward(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in FLEET_ROUTES:
            return PlainTextResponse("not a Fleet API route\n", status_code=404)
        assert client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream = await client.post(f"/v1/fleet/{name}", content=await request.body(),
                                         headers=headers, params=request.query_params)
        except httpx.TransportError:
            return PlainTextResponse("SuperLink unreachable\n", status_code=502)
        back = {k: v for k, v in upstream.headers.items()
                if k.lower() not in _NOT_FORWARDED_BACK}
        return Response(upstream.content, status_code=upstream.status_code, headers=back)

    async def refuse(request: Request) -> Response:
        return PlainTextResponse("not a Fleet API route\n", status_code=404)

    return Starlette(lifespan=lifespan, routes=[
        Route("/v1/fleet/{name}", forward, methods=["POST"]),
        Route("/{path:path}", refuse, methods=["GET", "POST", "PUT", "PATCH", "DELETE",
                                               "HEAD", "OPTIONS"]),
    ])


def serve(listen: str, superlink: str, certfile: str, keyfile: str, ca_certfile: str
          ) -> None:
    host, port = check_address(listen, "--listen")
    up_host, _ = check_address(superlink, "--superlink")
    if up_host not in ("127.0.0.1", "localhost", "::1"):
        raise DeployError(f"--superlink: {superlink!r} must be a loopback address: the "
                          "SuperLink itself never faces the network")
    for path, what in ((certfile, "--ssl-certfile"), (keyfile, "--ssl-keyfile"),
                       (ca_certfile, "--ssl-ca-certfile")):
        check_file(path, what)
    uvicorn.run(build_app(superlink, ca_certfile), host=host, port=port,
                ssl_certfile=certfile, ssl_keyfile=keyfile, log_level="warning",
                access_log=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="TLS gateway exposing only a loopback SuperLink's Fleet API")
    parser.add_argument("--listen", required=True,
                        help="where SuperNodes connect, HOST:PORT (e.g. 0.0.0.0:9092)")
    parser.add_argument("--superlink", required=True,
                        help="the SuperLink's loopback address, 127.0.0.1:PORT")
    parser.add_argument("--ssl-certfile", required=True, help="server.pem")
    parser.add_argument("--ssl-keyfile", required=True, help="server.key")
    parser.add_argument("--ssl-ca-certfile", required=True, help="ca.crt")
    args = parser.parse_args(argv)
    try:
        serve(args.listen, args.superlink, args.ssl_certfile, args.ssl_keyfile,
              args.ssl_ca_certfile)
    except DeployError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
