"""One real `DeltaFedAvg` round over given deltas: the strategy's own sampling, instruction,
reply screening and aggregation, with the server's validation reference stood in for by a
fixed vector. Shared by the tests of the validation check's weightings."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from conftest import FakeGrid
from wire import reply

from fedtune.config import AggregationConfig
from fedtune.wire.delta import DeltaSpec
from strategies import DeltaFedAvg

SPEC = DeltaSpec.from_state({"w": torch.zeros(4), "b": torch.zeros(2)}, "bb", {"m": 1})


def one_round(cfg: AggregationConfig, deltas: np.ndarray,
              reference: np.ndarray | Callable[[np.ndarray], np.ndarray]):
    """(the global vector sent, the round's result) for five clients, partition i sending
    `deltas[i]` with 10 examples. `reference`: the server's direction, or the function the
    strategy asks for it at the global vector."""
    cfg.validate()
    strategy = DeltaFedAvg(SPEC, 5, seed=0, aggregation=cfg,
                           reference=reference if callable(reference) else lambda v: reference)
    strategy.roster = {i: 11 + i for i in range(5)}
    cohort = strategy.sample(1, FakeGrid(list(strategy.roster.values())))
    start = np.arange(6, dtype=np.float32)
    sent = strategy.configure_train(1, start, 0.1, cohort)
    by_pid = {sent.asked[m.metadata.dst_node_id]: m for m in sent.messages}
    return start, strategy.aggregate_train(
        sent, [reply(by_pid[pid], deltas[pid], SPEC, n=10) for pid in sorted(by_pid)])
