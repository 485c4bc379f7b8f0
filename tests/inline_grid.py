"""A real run in one process, with a recorder on every wire: the real ServerApp round loop
(`strategies.server.run_server`) drives the real ClientApp handlers through a Grid that
calls them directly (no Ray), and every record key a reply carries and every tensor the
split body receives is written down under the name the wire-field table uses
(`fedtune.wire.fields`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.common import MessageType

from fedtune.config import ExperimentConfig
from fedtune.split import flops as split_flops_module

# Tiny: what these runs check is what crosses the wire, not what is learnt.
TINY = ["data.num_clients=3", "train.clients_per_round=2", "train.rounds=1",
        "train.local_steps=2", "train.batch_size=4", "model.max_length=16",
        "tuning.prompt.length=4", "train.eval_max_examples=16", "train.round_timeout_s=60"]


def record_keys(content: RecordDict) -> set[str]:
    """`record.key` for every value a message carries (arrays, metrics, configs)."""
    keys: set[str] = set()
    for name, record in content.items():
        keys |= {f"{name}.{key}" for key in record}
    return keys


class RecordingBody:
    """Wraps the split body every client of the process uses: records what it receives,
    as `body.<call>.<tensor>` (`body.probe.*` while FLOPs are being measured)."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.split = body.split
        self.keys: set[str] = set()
        self.tensors: list[tuple[str, torch.Tensor]] = []

    def _call(self, call: str) -> str:
        probing = getattr(split_flops_module, "probing", lambda: False)
        return "probe" if probing() else call

    def _keep(self, key: str, tensor: torch.Tensor) -> None:
        self.keys.add(key)
        self.tensors.append((key, tensor.detach().clone()))

    def forward(self, smashed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        call = self._call("forward")
        self._keep(f"body.{call}.activations", smashed)
        self._keep(f"body.{call}.attention_mask", mask)
        return self.body.forward(smashed, mask)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        self._keep(f"body.{self._call('backward')}.gradients", grad)
        return self.body.backward(grad)

    def evaluate(self, smashed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        call = self._call("evaluate")
        self._keep(f"body.{call}.activations", smashed)
        self._keep(f"body.{call}.attention_mask", mask)
        return self.body.evaluate(smashed, mask)


class InlineGrid:
    """A Grid whose nodes are ClientApp handlers in this process; records what each
    reply carries by message type."""

    def __init__(self, cfg: ExperimentConfig,
                 node_configs: dict[int, dict[str, object]] | None = None) -> None:
        self.cfg = cfg
        # partition id -> node config keys beside `partition-id` (a node's `data-path`)
        self.node_configs = node_configs or {}
        self.nodes = {1000 + pid: pid for pid in range(cfg.data.num_clients)}
        self.states = {node: RecordDict() for node in self.nodes}
        self.replies: list[Message] = []
        self.keys: dict[str, set[str]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Any) -> list[str]:
        from clients.handlers import handle_query, handle_train

        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(run_id=1, node_id=node,
                              node_config={"partition-id": self.nodes[node],
                                           **self.node_configs.get(self.nodes[node], {})},
                              state=self.states[node], run_config={})
            kind = msg.metadata.message_type
            if kind == MessageType.QUERY:
                reply = handle_query(msg, context, self.cfg)
                name = "discovery reply"
            else:
                reply = handle_train(msg, context, self.cfg)
                name = "train reply"
            self.keys.setdefault(name, set()).update(record_keys(reply.content))
            self.replies.append(reply)
        return ["" for _ in messages]

    def pull_messages(self, ids: Any) -> list[Message]:
        out, self.replies = self.replies, []
        return out


def inline_run(cfg: ExperimentConfig, out: Path, monkeypatch: Any,
               node_configs: dict[int, dict[str, object]] | None = None
               ) -> tuple[dict[str, Any], InlineGrid, RecordingBody | None]:
    """Run `cfg` in process into `out` (`node_configs`: partition id -> more node config);
    returns (summary, grid, body recorder)."""
    from clients import split as split_client
    from strategies.server import run_server

    recorder = None
    if cfg.split.enabled:
        body = split_client.config_body(cfg)
        recorder = RecordingBody(body)
        monkeypatch.setattr(split_client, "config_body", lambda _cfg: recorder)
        split_flops_module._CACHE.clear()  # measured once per process: measure in this run
    from strategies.discovery import discover

    grid = InlineGrid(cfg, node_configs)
    # Discovery here (its replies are recorded too), then the round loop on its roster:
    # a grid that is not the simulation engine's is otherwise a deployment.
    roster = discover(grid, cfg.data.num_clients, cfg.train.round_timeout_s)  # type: ignore
    summary = run_server(grid, cfg, out, roster=roster)  # type: ignore[arg-type]
    return summary, grid, recorder
