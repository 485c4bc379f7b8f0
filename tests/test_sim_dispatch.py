"""fedtune.compat.flower_sim: the simulation engine's message hand-out keeps Flower's
semantics (per tick, at most one undelivered message per known node, marked delivered), is
installed only on the Flower versions it was tested on, and falls back to Flower's own loop
anywhere else."""

import logging
import threading
from queue import Queue
from types import SimpleNamespace

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from fedtune.compat import flower_sim
from fedtune.compat.flower_sim import (
    dispatch_messages,
    fast_dispatch_installed,
    flower_version,
    install_fast_dispatch,
    is_tested,
    uninstall_fast_dispatch,
)

FLOWER_OWN = vce_api.add_messages_to_queue


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


@pytest.fixture(autouse=True)
def _flower_own_dispatch():
    """Each test starts and ends with Flower's own hand-out and no fallback logged yet."""
    uninstall_fast_dispatch()
    flower_sim._fallback_logged.clear()
    yield
    uninstall_fast_dispatch()
    flower_sim._fallback_logged.clear()


@pytest.fixture
def real_state():
    """Build Flower's in-memory LinkState the way its simulation engine does (run, task,
    registered nodes) and, with `push`, push one message per node twice; returns (state,
    nodes, state factory, grid, run)."""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id = 11, 7
    TaskIdentity.node_id = SUPERLINK_NODE_ID  # what Messages the ServerApp sends carry

    def build(num_nodes=3, push=True):
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                                   ObjectStoreFactory())
        state = factory.state()
        run = Run.create_empty(run_id=7)
        run.primary_task_id, run.federation_id = 11, NOOP_FEDERATION_ID
        state.run_ids[7] = RunRecord(run=run)
        state.task_store[11] = Task(task_id=11, run_id=7)
        nodes = vce_api._register_nodes(num_nodes, factory)
        grid = InMemoryGrid(factory, pull_interval=0.01)
        grid.set_run(run)
        if push:
            grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="query")
                                for n in [*nodes, *nodes]])
        return state, nodes, factory, grid, run

    try:
        yield build
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _one_tick(dispatch, state, nodes) -> list:
    queue: Queue = Queue()
    dispatch(state, queue, nodes, _OneTick())
    return [queue.get_nowait() for _ in range(queue.qsize())]


def test_one_message_per_known_node_per_tick_marked_delivered():
    msgs = {"a": _msg(1), "b": _msg(1), "c": _msg(2), "d": _msg(9)}
    checked = []
    state = SimpleNamespace(lock=threading.RLock(), message_ins_store=msgs,
                            _check_stored_messages=checked.append)
    out = _one_tick(dispatch_messages, state, {1: 0, 2: 1})
    assert out == [msgs["a"], msgs["c"]]
    assert all(m.metadata.delivered_at for m in out)
    assert msgs["b"].metadata.delivered_at == "" and msgs["d"].metadata.delivered_at == ""
    assert checked == [{"a", "b", "c", "d"}]  # Flower's expiry check saw every message


def test_expired_messages_dropped_by_the_check_are_not_handed_out():
    msgs = {"a": _msg(1)}
    state = SimpleNamespace(lock=threading.RLock(), message_ins_store=msgs,
                            _check_stored_messages=lambda ids: msgs.clear())
    assert _one_tick(dispatch_messages, state, {1: 0}) == []


def test_installed_on_the_running_flower_hands_out_what_flowers_own_loop_does(real_state):
    """Patched path: the installed Flower (1.41 or 1.42) is a tested version; on its real
    in-memory LinkState the patched loop delivers the same messages, tick by tick, as
    Flower's own loop on an identical state."""
    assert is_tested(flower_version())
    assert install_fast_dispatch() is True and fast_dispatch_installed()
    patched = vce_api.add_messages_to_queue
    assert patched is not FLOWER_OWN
    for _ in range(2):  # a second install keeps Flower's original to fall back to
        assert install_fast_dispatch() is True
    state_a, nodes_a, *_ = real_state()
    state_b, nodes_b, *_ = real_state()
    for tick in range(3):
        ours = _one_tick(patched, state_a, nodes_a)
        flowers = _one_tick(FLOWER_OWN, state_b, nodes_b)
        # Node ids are random per state: compare which node (by partition) got how many.
        assert sorted(nodes_a[m.metadata.dst_node_id] for m in ours) == \
            sorted(nodes_b[m.metadata.dst_node_id] for m in flowers) == \
            ([0, 1, 2] if tick < 2 else [])
        assert all(m.metadata.delivered_at for m in ours)
    uninstall_fast_dispatch()
    assert vce_api.add_messages_to_queue is FLOWER_OWN and not fast_dispatch_installed()


class _InThreadBackend:
    """Flower's Backend interface, running the ClientApp in the engine's own worker threads
    instead of Ray actors: the real engine (`vce_api.run_api`) without Ray's start-up."""

    def __init__(self) -> None:
        self.app = None

    def build(self, app_fn) -> None:
        self.app = app_fn()

    @property
    def num_workers(self) -> int:
        return 2

    def process_message(self, message, context):
        return self.app(message, context), context

    def terminate(self) -> None:
        pass


@pytest.mark.parametrize("fast", [True, False], ids=["fedtune-hand-out", "flower-hand-out"])
def test_the_real_engine_discovers_every_node_through_either_hand_out(real_state, fast):
    """Flower's engine (hand-out, worker threads, reply writer, InMemoryGrid) with 60
    virtual clients answering a partition query each, through fedtune's `send_and_receive`:
    every node answers once with its own partition, with either hand-out."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics

    from strategies.grid_io import send_and_receive

    app = ClientApp()

    @app.query()
    def query(msg, context):
        pid = context.node_config["partition-id"]
        return Message(RecordDict({"m": MetricRecord({"pid": pid})}), reply_to=msg)

    assert install_fast_dispatch(None if fast else "0.0.0") is fast
    state, nodes, factory, grid, run = real_state(num_nodes=60, push=False)
    stores = vce_api._register_node_info_stores(nodes, run)
    f_stop = threading.Event()
    engine = threading.Thread(target=vce_api.run_api, args=(
        lambda: app, _InThreadBackend, nodes, factory, stores, f_stop, VceMetrics()))
    engine.start()
    try:
        replies = send_and_receive(grid, [
            Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes],
            timeout=60)
    finally:
        f_stop.set()
        engine.join(timeout=10)
    assert not engine.is_alive()
    got = {r.metadata.src_node_id: r.content["m"]["pid"] for r in replies}
    assert len(replies) == 60 and got == nodes


@pytest.mark.parametrize("other", ["1.43.0", "1.40.2", "2.0.0", ""])
def test_untested_flower_keeps_its_own_loop_and_says_so_once(other, caplog):
    """Fallback path: the version check fails, so Flower's loop stays (also after an earlier
    install), with one info line however often it is asked."""
    install_fast_dispatch()
    with caplog.at_level(logging.INFO, logger=flower_sim.__name__):
        assert install_fast_dispatch(other) is False
        assert install_fast_dispatch(other) is False
    assert vce_api.add_messages_to_queue is FLOWER_OWN and not fast_dispatch_installed()
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "own message hand-out" in notes[0]
    assert (other or "(not installed)") in notes[0]


def test_a_state_other_than_the_in_memory_one_gets_flowers_loop(caplog):
    calls = []
    vce_api.add_messages_to_queue = lambda *args: calls.append(args)  # stands for Flower's
    try:
        assert install_fast_dispatch() is True
        state = SimpleNamespace(lock=threading.RLock(), message_ins_store={"a": _msg(1)},
                                _check_stored_messages=lambda ids: None)
        with caplog.at_level(logging.INFO, logger=flower_sim.__name__):
            vce_api.add_messages_to_queue(state, Queue(), {1: 0}, _OneTick())
        assert len(calls) == 1 and calls[0][0] is state
        assert "not the in-memory one" in caplog.records[0].getMessage()
    finally:
        uninstall_fast_dispatch()
        vce_api.add_messages_to_queue = FLOWER_OWN


def test_run_simulation_deprecation_notice_is_dropped_and_other_notices_kept():
    keep = flower_sim._DropRunSimulationNotice()

    def record(msg, *args):
        return logging.LogRecord("flwr", logging.WARNING, __file__, 1, msg, args, None)

    assert not keep.filter(record("DEPRECATED FEATURE: %s", "The `run_simulation` function "
                                  "is deprecated and will be removed"))
    assert keep.filter(record("DEPRECATED FEATURE: %s", "`Grid.create_message` is deprecated"))
    assert keep.filter(record("Sampling failed: %s", "run_simulation"))


def test_run_inprocess_passes_the_apps_through_without_the_deprecation_notice(monkeypatch):
    import flwr.simulation

    calls, seen = [], []

    def fake_run_simulation(**kwargs):
        calls.append(kwargs)
        flwr_logger = logging.getLogger("flwr")
        flwr_logger.warning("DEPRECATED FEATURE: %s", "The `run_simulation` function is "
                            "deprecated and will be removed in a future version of Flower.")
        flwr_logger.warning("sampling: %s", "kept")

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Catch()
    logging.getLogger("flwr").addHandler(handler)
    # An in-process run earlier in this worker may have left Flower's level at ERROR.
    monkeypatch.setattr(logging.getLogger("flwr"), "level", logging.INFO)
    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    try:
        flower_sim.run_inprocess("server", "client", 5, {"init_args": {}}, verbose=True)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert calls == [{"server_app": "server", "client_app": "client", "num_supernodes": 5,
                      "backend_config": {"init_args": {}}, "verbose_logging": True}]
    assert seen == ["sampling: kept"]
    assert not logging.getLogger("flwr").filters  # the filter lives only for the call


def test_run_inprocess_on_a_flower_without_run_simulation_says_so(monkeypatch):
    import flwr.simulation

    monkeypatch.delattr(flwr.simulation, "run_simulation")
    with pytest.raises(RuntimeError, match="has no flwr.simulation.run_simulation"):
        flower_sim.run_inprocess("server", "client", 5, {})
