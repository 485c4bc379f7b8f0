"""`send_and_receive` with a short pull interval.

Flower's deployment Grid (`HttpGrid`, 1.41 and 1.42 alike) waits a fixed 3 s between pulls
for replies, and `Grid.send_and_receive` takes no interval; on a round that takes well under
a second of client work that wait dominates. This is the same push-then-pull loop, on the
public `Grid.push_messages` / `Grid.pull_messages` only, with a configurable pause: the run's
`[runtime] grid_poll_s` ("auto": 0.02 s on the simulation's in-memory grid, where a pull
costs microseconds, 0.1 s on a deployment's), which `FEDTUNE_GRID_POLL_S` overrides
(fedtune.config.runtime; the ServerApp process inherits the SuperLink's environment).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.compat.flower_deploy import is_simulation_grid
from fedtune.config.runtime import runtime_settings


def poll_interval(grid: object = None, cfg: Any = None) -> float:
    """Seconds between pulls on `grid` (None: a deployment's) for the run of `cfg` (an
    ExperimentConfig or its RuntimeConfig; None: the defaults): `FEDTUNE_GRID_POLL_S` if
    set, else the config's `runtime.grid_poll_s`."""
    simulation = grid is not None and is_simulation_grid(grid)
    return runtime_settings(cfg, simulation=simulation).grid_poll_s


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float,
                     abort: Callable[[], bool] | None = None,
                     pause: float | None = None) -> list[Message]:
    """Push `messages`, then pull replies until all arrived, `timeout` seconds passed or
    `abort()` returns True, pausing `pause` seconds between pulls (the run's
    `poll_interval(grid, cfg)`; None: the defaults' for this grid, and the environment).
    Flower's grids give each message, in place, the id `push_messages` returns; the round's
    screen (`Sent.instruction_ids`) matches each reply's `reply_to_message_id` against those
    ids, so a reply the pull lets through still answers a message this round sent."""
    if pause is None:
        pause = poll_interval(grid)
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= deadline or (abort is not None and abort()):
            break
        time.sleep(pause)
    return replies
