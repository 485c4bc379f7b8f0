"""The Flower internals fedtune's deployment path uses, and nothing else uses.

Flower (1.41, 1.42) offers no public setting for two things the deployment needs for its
<= 2 s round (benchmarks/deploy_latency.py, benchmarks/RESULTS.md):

- `supernode-poll-cap`: the SuperNode sleeps a hard-coded 3 s when the SuperLink has no
  message and 0.5 s between checks for the ClientApp's reply
  (`flwr/supernode/start_client_internal.py`). Capping them at 0.1 s took a round from
  4.5 s to 1-1.8 s.
- `long-lived-worker`: `flwr-clientapp` serves one message and exits, so every round pays
  Python start-up, the imports and the backbone load again (13 s vs 1-1.8 s a round).
  fedtune's worker talks to the SuperNode's Runtime API itself (`flwr.proto.runtime_pb2`,
  `RuntimeHttpClient`, `run_clientapp.pull_task_input/push_*`) and stays loaded.

- `supernode-client-cert`: Flower's SuperNode has no option for a TLS client certificate,
  and the Fleet gateway requires one (mTLS, `fedtune.deploy.fleet_gateway`). The patch
  gives the SuperNode's Fleet client (`flwr/supernode/fleet_http_connection.py`, its
  `FleetHttpClient.from_server_address`) an SSL context holding the node's certificate.
  There is no public fallback: on another Flower version a SuperNode asked for a client
  certificate refuses to start, with one line (fail closed).

Each is used only on the Flower versions it was tested on (`PATCHES`). On any other version
`enabled()` says no, with one log line, and callers use Flower's public behaviour: plain
`flower-supernode`, and a new `flwr-clientapp` per message (`--isolation subprocess`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import ssl
import time
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import Context, Message

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    tested: tuple[str, ...]  # Flower "major.minor" versions this patch was checked on
    fallback: str            # what runs instead elsewhere (for the log line)


PATCHES: dict[str, Patch] = {
    "supernode-poll-cap": Patch(
        ("1.41", "1.42"), "plain flower-supernode (3 s / 0.5 s poll sleeps)"),
    "long-lived-worker": Patch(
        ("1.41", "1.42"), "a new flwr-clientapp per message (--isolation subprocess)"),
    "supernode-client-cert": Patch(
        ("1.41", "1.42"), "none: the SuperNode refuses to start (no client certificate)"),
}

_noted: set[str] = set()


class UnsupportedFlower(RuntimeError):
    """A patch was asked for on a Flower version it was not tested on."""


def flower_version() -> str:
    return importlib.metadata.version("flwr")


def minor(version: str) -> str:
    """'1.42.0' -> '1.42' (also for pre-releases such as '1.43.0rc1')."""
    return ".".join(version.split(".")[:2])


def enabled(name: str, version: str | None = None) -> bool:
    """Whether patch `name` applies to `version` (default: the installed Flower); when it
    does not, logs once per process which public behaviour is used instead."""
    patch = PATCHES[name]
    version = flower_version() if version is None else version
    if minor(version) in patch.tested:
        return True
    if name not in _noted:
        _noted.add(name)
        _log.warning("fedtune: Flower %s is untested for %s (tested: %s); using %s",
                     version, name, ", ".join(patch.tested), patch.fallback)
    return False


def _require(name: str) -> None:
    if not enabled(name):
        patch = PATCHES[name]
        raise UnsupportedFlower(
            f"{name} needs Flower {' or '.join(patch.tested)}, installed {flower_version()}; "
            f"use {patch.fallback}")


# -- supernode-poll-cap ----------------------------------------------------------------

class _CappedSleep(ModuleType):
    """The `time` module, except that `sleep` waits at most `cap` seconds."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def cap_supernode_polls(cap: float, version: str | None = None) -> bool:
    """Cap the SuperNode main loop's sleeps at `cap` seconds (this process only); returns
    False, leaving Flower untouched, on an untested version."""
    if not enabled("supernode-poll-cap", version):
        return False
    from flwr.supernode import start_client_internal

    start_client_internal.time = _CappedSleep(cap)  # type: ignore[attr-defined]
    return True


# -- supernode-client-cert -------------------------------------------------------------

def client_ssl_context(root_certificates: bytes | str | None, certfile: str, keyfile: str
                       ) -> ssl.SSLContext:
    """Verify the server with `root_certificates` (a path or PEM bytes; None: the system's
    CAs) and present `certfile`/`keyfile` as this client's certificate."""
    if isinstance(root_certificates, bytes):
        context = ssl.create_default_context(cadata=root_certificates.decode("ascii"))
    else:
        context = ssl.create_default_context(cafile=root_certificates)
    context.load_cert_chain(certfile, keyfile)
    return context


def use_client_certificate(certfile: str, keyfile: str, version: str | None = None) -> None:
    """Make this process's SuperNode present `certfile`/`keyfile` in its TLS handshakes
    with the Fleet API. Raises UnsupportedFlower on an untested Flower version."""
    version = flower_version() if version is None else version
    if not enabled("supernode-client-cert", version):
        raise UnsupportedFlower(
            f"Flower {version} is untested for a SuperNode TLS client certificate (tested: "
            f"{', '.join(PATCHES['supernode-client-cert'].tested)}); the Fleet gateway "
            "refuses a SuperNode without one")
    from flwr.supernode import fleet_http_connection

    base: Any = fleet_http_connection.FleetHttpClient

    class FleetClientWithCertificate(base):  # type: ignore[misc, valid-type]
        @classmethod
        def from_server_address(cls, server_address: str, insecure: bool,
                                root_certificates: bytes | str | None,
                                interceptors: Any, *, retry_invoker: Any = None) -> Any:
            if insecure:
                raise ValueError("a TLS client certificate needs TLS (drop --insecure)")
            return cls(f"https://{server_address}", interceptors=interceptors,
                       verify=client_ssl_context(root_certificates, certfile, keyfile),
                       retry_invoker=retry_invoker)

    fleet_http_connection.FleetHttpClient = FleetClientWithCertificate  # type: ignore[misc]


# -- long-lived-worker -----------------------------------------------------------------

class RuntimeApi:
    """The SuperNode's Runtime API as `flwr-clientapp` uses it: ask for a ClientApp task,
    then (with the task's token) pull its input, push the reply and the final status."""

    def __init__(self, address: str, root_certificates: str | None = None,
                 token: str | None = None) -> None:
        _require("long-lived-worker")
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address, self.root_certificates, self.token = address, root_certificates, token
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        self.client = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=root_certificates is None,
            root_certificates=root_certificates, interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker())

    def acquire(self) -> RuntimeApi | None:
        """A connection for the next pending ClientApp task, or None when there is none.
        Raises httpx.TransportError while the SuperNode is unreachable."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        res = self.client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
        if not (res.HasField("task") and res.token):
            return None
        return RuntimeApi(self.address, self.root_certificates, token=res.token)

    def pull(self) -> tuple[Message, Context, str, str]:
        """The task's message and context, and its run's (FAB id, FAB version)."""
        from flwr.supernode.runtime.run_clientapp import pull_task_input

        message, context, run, _fab = pull_task_input(self.client)
        return message, context, run.fab_id, run.fab_version

    def heartbeat(self) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        self.client.SendTaskHeartbeat(SendTaskHeartbeatRequest())

    def reply(self, message: Message, context: Context) -> None:
        from flwr.supernode.runtime.run_clientapp import push_message

        push_message(self.client, message, context)

    def finish(self, context: Context | None, completed: bool, details: str) -> None:
        """The task's final status (and context, when it got that far)."""
        from flwr.common.constant import SubStatus
        from flwr.supernode.runtime.run_clientapp import push_task_output

        push_task_output(client=self.client, context=context, details=details,
                         sub_status=SubStatus.COMPLETED if completed else SubStatus.FAILED)

    def close(self) -> None:
        self.client.close()


def error_reply(message: Message, details: str) -> Message:
    """The reply `flwr-clientapp` sends when the ClientApp raised (`details` says what)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                   reply_to=message)


# -- the simulation's grid (no patch: a type check) -----------------------------------

def is_simulation_grid(grid: object) -> bool:
    """Whether the ServerApp got the simulation engine's in-memory grid. Where Flower's
    class cannot be found, it says no: a deployment's rules (e.g. no seeded noise) then
    also apply to a simulation, the safe side."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:
        _log.warning("fedtune: flwr.superlink.grid.InMemoryGrid not found in Flower %s; "
                     "treating every grid as a deployment's", flower_version())
        return False
    return isinstance(grid, InMemoryGrid)
