"""What the simulation's driver hands the ServerApp besides the config: the work it finishes
before the first round (`Preparation`), and the callback each round's record goes to. Shared
by the light `strategies.server_app` and the round loop `strategies.server`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RoundCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Preparation:
    """Work the ServerApp finishes before its first round (the simulation's driver imports
    its code and builds its task in another thread while the workers start): `finish()`
    waits for the task and raises its error; `failed()` says, without waiting, whether it
    has failed already; `imported()` waits for the imports."""

    finish: Callable[[], None]
    failed: Callable[[], bool]
    imported: Callable[[], None] = field(default=lambda: None)
    # Takes the summary `run_server` returns (the driver returns it, not a re-read file).
    summary: Callable[[dict[str, Any]], None] = field(default=lambda summary: None)
