"""Trivial ServerApp/ClientApp: each round sends a 1,000-float vector to every node and
waits for the echo, through the same `send_and_receive` fedtune's ServerApp uses. The
ServerApp writes the per-round wall times as JSON to the run config's `out`."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from strategies.grid_io import send_and_receive

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds, nodes = int(context.run_config["rounds"]), int(context.run_config["nodes"])
    deadline = time.monotonic() + 120
    while len(node_ids := sorted(grid.get_node_ids())) < nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {nodes} nodes connected")
        time.sleep(0.2)
    vector = np.zeros(1000, dtype=np.float32)
    times = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        messages = [Message(RecordDict({"arrays": ArrayRecord([vector])}),
                            message_type=MessageType.TRAIN, dst_node_id=n, group_id=str(rnd))
                    for n in node_ids]
        replies = send_and_receive(grid, messages, timeout=300)
        if len(replies) != nodes or any(r.has_error() for r in replies):
            raise RuntimeError(f"round {rnd}: {len(replies)} replies, errors: "
                               f"{[r.error.reason for r in replies if r.has_error()]}")
        times.append(time.perf_counter() - t0)
    Path(str(context.run_config["out"])).write_text(json.dumps({"round_s": times}))


@client.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": msg.content["arrays"],
                               "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
