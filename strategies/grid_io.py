"""`send_and_receive` with a short pull interval.

Flower's deployment Grid (`HttpGrid`, 1.41 and 1.42 alike) waits a fixed 3 s between pulls
for replies, and `Grid.send_and_receive` takes no interval; on a round that takes well under
a second of client work that wait dominates. This is the same push-then-pull loop, on the
public `Grid.push_messages` / `Grid.pull_messages` only, with a configurable pause
(`FEDTUNE_GRID_POLL_S`, default 0.1 s, read by the ServerApp process, which inherits the
SuperLink's environment). The simulation engine's Grid polls every 0.1 s already, so both
paths behave alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.config.runtime import runtime_settings

POLL_ENV = "FEDTUNE_GRID_POLL_S"


def poll_interval() -> float:
    return runtime_settings().grid_poll_s


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float,
                     abort: Callable[[], bool] | None = None) -> list[Message]:
    """Push `messages`, then pull replies until all arrived, `timeout` seconds passed or
    `abort()` returns True."""
    pause = poll_interval()
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
