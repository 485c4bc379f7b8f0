"""Shared steps of the ledger-level tests: rounds played in full (or to the first stop), and
the checkpoint a kill after them leaves (a copy, so later charges do not reach it)."""

from __future__ import annotations

from fedtune.privacy import DPHistory
from fedtune.run.checkpoint import ServerState


def play_rounds(ledger, state, rounds, cohort) -> None:
    """Each round of `rounds` checked, sent to `cohort`, settled and checkpointed."""
    for rnd in rounds:
        assert ledger.stop(rnd, cohort) is None
        ledger.charge_sent(rnd, cohort)
        ledger.settle(rnd)
        state.round = rnd


def first_stop(ledger, state, rounds, cohort) -> str | None:
    """The curator's reason of the first stop in rounds 1..`rounds` with `cohort` sampled
    every round, charged as the server charges them, or None."""
    for rnd in range(1, rounds + 1):
        stop = ledger.stop(rnd, cohort)
        if stop is not None:
            return stop.curator
        ledger.charge_sent(rnd, cohort)
        ledger.settle(rnd)
        state.round = rnd
    return None


def checkpoint_copy(state: ServerState) -> ServerState:
    """What the checkpoint of `state` holds for the ledger, copied."""
    return ServerState(round=state.round, vector=state.vector, spec_hash="x", initial={},
                       client_dp={k: DPHistory(list(v.entries))
                                  for k, v in state.client_dp.items()},
                       client_eps=dict(state.client_eps), examples=dict(state.examples),
                       user_releases=state.user_releases)
