"""The simulation engine's message hand-out (fedtune.sim._dispatch_messages) keeps Flower's
semantics: per tick, at most one undelivered message per known node, marked delivered."""

import threading
from queue import Queue
from types import SimpleNamespace

from fedtune.sim import _dispatch_messages


class _OneTick:
    """An f_stop that lets the loop run exactly once."""

    def __init__(self) -> None:
        self.ticks = 0

    def is_set(self) -> bool:
        return self.ticks > 0

    def wait(self, timeout: float) -> None:
        self.ticks += 1


def _msg(dst: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst, delivered_at=""))


def test_one_message_per_known_node_per_tick_marked_delivered():
    msgs = {"a": _msg(1), "b": _msg(1), "c": _msg(2), "d": _msg(9)}
    checked = []
    state = SimpleNamespace(lock=threading.RLock(), message_ins_store=msgs,
                            _check_stored_messages=checked.append)
    queue: Queue = Queue()
    _dispatch_messages(state, queue, {1: 0, 2: 1}, _OneTick())
    out = [queue.get_nowait() for _ in range(queue.qsize())]
    assert out == [msgs["a"], msgs["c"]]
    assert all(m.metadata.delivered_at for m in out)
    assert msgs["b"].metadata.delivered_at == "" and msgs["d"].metadata.delivered_at == ""
    assert checked == [{"a", "b", "c", "d"}]  # Flower's expiry check saw every message


def test_expired_messages_dropped_by_the_check_are_not_handed_out():
    msgs = {"a": _msg(1)}
    state = SimpleNamespace(lock=threading.RLock(), message_ins_store=msgs,
                            _check_stored_messages=lambda ids: msgs.clear())
    queue: Queue = Queue()
    _dispatch_messages(state, queue, {1: 0}, _OneTick())
    assert queue.empty()
