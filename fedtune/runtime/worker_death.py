"""A simulation worker that died stays dead for the rest of the run.

Flower's Ray backend puts the actor of a failed message back into its pool, also when Ray
killed it (its out-of-memory monitor, a crash, a lost node): every later message sent to
that actor fails the same way. A run that went on would play its remaining rounds with
nobody (or fewer clients) training, charging each sampled client's privacy budget and, under
user-level DP, adding noise to the model. The server stops it instead, after the round's
checkpoint, with one line naming the cause; `fedtune run --resume` starts fresh workers.

Only the simulation engine's own failures are read here: in a simulation every error reply
comes from the server process' Flower backend (`str(type(exc)) + ":<'" + str(exc) + "'>"`);
a ClientApp's exception arrives wrapped as Flower's `ClientAppException`, not as one of Ray's
worker deaths. A deployment's error replies are a node's own text and never stop a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Ray's exceptions for a worker process that is gone (not an error raised inside it, which
# Ray wraps as RayTaskError, nor ActorUnavailableError, which a restart can clear).
WORKER_DEATHS = {
    "OutOfMemoryError": "Ray killed the worker because the machine ran low on memory: lower "
                        "train.batch_size or model.max_length, run fewer jobs beside it, or "
                        "give each client more memory",
    "ActorDiedError": "the worker process died",
    "RayActorError": "the worker process died",
    "WorkerCrashedError": "the worker process crashed",
    "NodeDiedError": "the Ray node running the worker died",
    "LocalRayletDiedError": "Ray's local scheduler died",
}
_PREFIX = "<class 'ray.exceptions."


class WorkerDiedError(RuntimeError):
    """A simulation worker died: the run stopped after a round, with its checkpoint and
    ledger, and is resumable (no summary is written)."""


def worker_death(failed: Iterable[Mapping[str, Any]]) -> str | None:
    """The Ray exception class that killed a worker in a round's failed replies, if any
    (the first one met)."""
    for entry in failed:
        reason = str(entry.get("reason", ""))
        if not reason.startswith(_PREFIX):
            continue
        name = reason[len(_PREFIX):].split("'", 1)[0]
        if name in WORKER_DEATHS:
            return name
    return None


def stop_message(rnd: int, death: str, out_dir: object) -> str:
    """The one line a run stopped by a worker's death ends with."""
    return (f"round {rnd}: a simulation worker died (ray.exceptions.{death}: "
            f"{WORKER_DEATHS[death]}); Flower does not replace it, so the run stopped after "
            f"round {rnd} with its checkpoint. Resume with: fedtune run --resume {out_dir}")
