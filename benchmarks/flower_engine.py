"""Flower's own simulation engine, driven without Ray, to time its message hand-out against
fedtune's (`fedtune.compat.flower_sim`). Timing Flower's internal loop can only be done
through Flower's internal modules, so this harness imports them; it is the one file outside
fedtune/compat/ that may (tests/test_public_api.py names it), and it ships with the
benchmarks, not with the package. Used by benchmarks/sim_overhead.py (--hand-out,
--discovery --no-ray)."""

from __future__ import annotations

import time
from typing import Any


def _sim_state(num_nodes: int) -> tuple[Any, Any, Any, dict[int, int], Any]:
    """Flower's in-memory LinkState with a run and `num_nodes` registered nodes, built as
    its simulation engine builds them; returns (factory, state, run, node -> partition,
    InMemoryGrid)."""
    import secrets

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

    TaskIdentity.task_id, TaskIdentity.run_id = 11, 7
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 11, NOOP_FEDERATION_ID
    state.run_ids[7] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=7)
    nodes = {state.create_node("noop", "noop", secrets.token_bytes(32), 1e9): i
             for i in range(num_nodes)}
    for node in nodes:
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=1e9)
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return factory, state, run, nodes, grid


class _InThreadBackend:
    """Flower's simulation Backend interface with the ClientApp run in the engine's worker
    threads instead of Ray actors: the engine's own message path without Ray."""

    def __init__(self) -> None:
        self.app: Any = None

    def build(self, app_fn: Any) -> None:
        self.app = app_fn()

    @property
    def num_workers(self) -> int:
        return 2

    def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
        return self.app(message, context), context

    def terminate(self) -> None:
        pass


def engine_discovery(num_nodes: int, flower_dispatch: bool) -> dict[str, Any]:
    """Without Ray: Flower's engine (`vce_api.run_api`: hand-out, workers, reply writer)
    with an in-thread backend running the real ClientApp's query handler; the seconds
    `send_and_receive` takes to discover `num_nodes` nodes, then a 4-node query round."""
    import threading

    from flwr.app import Message, MessageType
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics

    from clients.handlers import build_client_app
    from fedtune.compat.flower_sim import fast_dispatch_installed, install_fast_dispatch
    from fedtune.wire.protocol import PartitionQuery
    from strategies.grid_io import send_and_receive

    if not flower_dispatch:
        install_fast_dispatch()
    factory, state, run, nodes, grid = _sim_state(num_nodes)
    stores = vce_api._register_node_info_stores(nodes, run)
    f_stop = threading.Event()
    app = build_client_app()
    engine = threading.Thread(target=vce_api.run_api, args=(
        lambda: app, _InThreadBackend, nodes, factory, stores, f_stop, VceMetrics()))
    engine.start()
    result: dict[str, Any] = {"nodes": num_nodes, "engine": "in-thread backend, no Ray",
                              "fedtune_dispatch": fast_dispatch_installed()}

    def query(targets: list[int]) -> list[Message]:
        return send_and_receive(grid, [Message(content=PartitionQuery().to_record(),
                                               message_type=MessageType.QUERY, dst_node_id=n)
                                       for n in targets], timeout=3600)
    try:
        t0 = time.perf_counter()
        result["replies"] = len(query(sorted(nodes)))
        result["discovery_s"] = round(time.perf_counter() - t0, 3)
        t1 = time.perf_counter()
        result["cohort_replies"] = len(query(sorted(nodes)[:4]))
        result["query_round_s"] = round(time.perf_counter() - t1, 3)
    finally:
        f_stop.set()
        engine.join()
    return result


def time_hand_out(num_nodes: int) -> dict[str, float]:
    """Without Ray: one message stored for each of `num_nodes` nodes in Flower's in-memory
    LinkState (built as its engine builds it), then the seconds one tick of the hand-out
    takes to queue them all, for Flower's loop and for fedtune's (`dispatch_messages`), and
    for one idle tick with the messages still stored (delivered, replies not yet pulled), as
    during every round."""
    from queue import Queue

    from flwr.app import Message
    from flwr.server.superlink.fleet.vce import vce_api

    from fedtune.compat.flower_sim import dispatch_messages
    from fedtune.wire.protocol import PartitionQuery

    class OneTick:
        ticks = 0

        def is_set(self) -> bool:
            return self.ticks > 0

        def wait(self, timeout: float) -> None:
            self.ticks += 1

    out: dict[str, float] = {"nodes": num_nodes}
    flowers = getattr(vce_api, "_fedtune_original_dispatch", vce_api.add_messages_to_queue)
    for name, dispatch in (("flower", flowers), ("fedtune", dispatch_messages)):
        factory, state, run, nodes, grid = _sim_state(num_nodes)
        grid.push_messages([Message(PartitionQuery().to_record(), dst_node_id=n,
                                    message_type="query") for n in nodes])
        for tick in ("discovery_tick_s", "idle_tick_s"):
            queue: Queue = Queue()
            t0 = time.perf_counter()
            dispatch(state, queue, nodes, OneTick())
            out[f"{name}_{tick}"] = time.perf_counter() - t0
            if tick == "discovery_tick_s":
                assert queue.qsize() == num_nodes, (name, queue.qsize())
    return out


# -- the parent: run both, time them -------------------------------------------------------
