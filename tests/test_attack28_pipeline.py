"""ATTACK28 (issue 28, target 1): the new round pipeline as a malicious client sees it.
`screen(sent, replies)` is the trust boundary (strategies/pipeline.py) and issue 28 made a
round's state travel in its `Sent` so that two rounds in flight are screened each against
what it sent; but a reply is matched to the round by its sender only, never by the message
it answers. The real loop holds today only because the Grid's `pull_messages(ids)` filters
(strategies.grid_io); the screen itself lets the reply in. Each test fails on 2a908aa."""

from __future__ import annotations

from uuid import uuid4

import numpy as np
import pytest
from wire import reply, spec_of, stray_message

from strategies.delta_fedavg import DeltaFedAvg

pytestmark = pytest.mark.usefixtures("task_identity")

SPEC = spec_of(6)


def _pushed(sent):
    """Give each message the id a Grid's push gives it (Flower's InMemoryGrid does this)."""
    for m in sent.messages:
        m.metadata.__dict__["_message_id"] = str(uuid4())
    return sent


def _fedavg():
    strategy = DeltaFedAvg(SPEC, 3, seed=0)
    strategy.roster = {pid: 100 + pid for pid in range(3)}
    return strategy


def test_a_late_reply_to_an_earlier_round_never_reaches_this_rounds_aggregate():
    """A reply to round 1's message never enters round 2, even from a node round 2 asked."""
    strategy = _fedavg()
    first = _pushed(strategy.configure_train(1, np.zeros(6, np.float32), 0.1, [0, 1]))
    second = _pushed(strategy.configure_train(2, np.ones(6, np.float32), 0.1, [0]))
    late = reply(first.messages[0], np.full(6, 5.0), SPEC)  # node 100, computed on round 1
    result = strategy.aggregate_train(second, [late])
    assert result.outcome.accepted == [], "round 1's reply was averaged into round 2"
    assert result.vector is None


def test_a_reply_to_a_message_never_sent_never_reaches_the_aggregate():
    """A reply whose reply_to names no message of this round is never accepted."""
    strategy = _fedavg()
    sent = _pushed(strategy.configure_train(1, np.zeros(6, np.float32), 0.1, [0]))
    forged = stray_message(100)
    forged.metadata.__dict__["_message_id"] = str(uuid4())
    result = strategy.aggregate_train(sent, [reply(forged, np.full(6, 5.0), SPEC)])
    assert result.outcome.accepted == [], "a reply to an unsent message was averaged in"
