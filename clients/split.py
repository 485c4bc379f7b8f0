"""The split-mode client (SFPrompt): the head and tail train here, the frozen body runs
behind a `BodyService`, and the labels never leave this module.

A split step: the head's cut-layer states go up, the body's output comes down, the tail
computes the loss and sends the gradient w.r.t. the body output up, and the gradient at the
cut comes down and finishes the backward through the head. Under DP-SGD the head and tail
run inside the Opacus-wrapped model, so their per-sample gradients are captured by its
hooks as usual; the server's gradient enters through `smashed.backward(grad)`, which the
hooks see like any other backward. Clipping and noise then cover prompt and tail jointly.

A local-loss step trains the prompt against a small auxiliary classifier on the cut-layer
features without any traffic. It is the client's own: kept in the node's state between
rounds, never federated.
"""

from __future__ import annotations

import functools

import torch
from flwr.app import ArrayRecord, Context
from torch import nn
from torch.utils.data import TensorDataset

from clients import pruning
from clients.train import LocalResult, local_steps
from fedtune.config import ExperimentConfig
from fedtune.models import load_backbone
from fedtune.models.split import SplitBackbone
from fedtune.split import (
    BodyService,
    InProcessBody,
    MeteredBody,
    SplitFlops,
    SplitPromptModel,
    scoring_flops,
    split_flops,
)
from fedtune.task import Task
from fedtune.tuning.base import ClassificationHead
from fedtune.tuning.prompt import PromptModel

AUX_STATE_KEY = "fedtune-split-aux"


@functools.lru_cache(maxsize=2)
def process_body(backbone: str, cut_layer: int) -> InProcessBody:
    """One body per process, on the process-wide backbone, shared by its virtual clients
    (a Ray actor serves one client at a time)."""
    return InProcessBody(SplitBackbone(load_backbone(backbone).model, cut_layer))


class SplitStep:
    """The `LocalStep` of split mode: the first `local_loss_steps` steps of a round train
    on the local loss, the rest are split steps through `body`."""

    def __init__(self, view: SplitPromptModel, body: BodyService, local_loss_steps: int
                 ) -> None:
        self.view = view
        self.body = MeteredBody(body)
        self.local_loss_steps = local_loss_steps
        self.examples = {"split": 0, "local": 0}
        self.steps = {"split": 0, "local": 0}
        self._flops: SplitFlops | None = None
        # Every tensor stays trainable until the first step: Opacus only hooks modules
        # that are trainable when it wraps the model.
        view.set_phase(local_loss=None)

    def __call__(self, model: nn.Module, criterion: nn.Module, ids: torch.Tensor,
                 mask: torch.Tensor, labels: torch.Tensor, index: int) -> torch.Tensor:
        local = index < self.local_loss_steps
        self.view.set_phase(local_loss=local)
        kind = "local" if local else "split"
        self.examples[kind] += int(labels.numel())
        self.steps[kind] += 1
        if local:
            loss = criterion(self.view.aux_logits(*self.view.cut(ids, mask)), labels)
            loss.backward()
            return loss.detach()
        return self._split_step(criterion, ids, mask, labels)

    def _split_step(self, criterion: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
        smashed, full_mask = self.view.cut(ids, mask)
        output = self.body.forward(smashed.detach(), full_mask).requires_grad_(True)
        loss = criterion(self.view.tail(output, mask), labels)
        loss.backward()  # tail gradients, and output.grad to send up
        smashed.backward(self.body.backward(output.grad))
        return loss.detach()

    def flops(self, model: nn.Module, data: TensorDataset, examples: int) -> float:
        self._flops = self._measure(data)
        # Training is over: every tensor trainable again, so trainable_state() is whole.
        self.view.set_phase(local_loss=None)
        return (self.examples["split"] * self._flops.client_split
                + self.examples["local"] * self._flops.client_local)

    def _measure(self, data: TensorDataset) -> SplitFlops:
        ids, mask, _ = data[0]
        # The process body, unmetered: measuring is not traffic.
        return split_flops(self.view, self.body.body, ids, mask)

    def extras(self) -> dict[str, float]:
        traffic = self.body.traffic
        flops = self._flops
        if flops is None:
            raise RuntimeError("extras() before flops(): local_train counts FLOPs first")
        return {
            "smashed-bytes-up": traffic.bytes_up,
            "smashed-bytes-down": traffic.bytes_down,
            "server-flops": self.examples["split"] * flops.server,
            "split-steps": self.steps["split"],
            "local-loss-steps": self.steps["local"],
            "split-examples": self.examples["split"],
            "local-loss-examples": self.examples["local"],
            "client-flops-per-example": flops.client_split,
            "full-model-flops-per-example": flops.full,
        }


def split_view(model: PromptModel, task: Task, cfg: ExperimentConfig, context: Context
               ) -> SplitPromptModel:
    """The client's training view of `model` cut at split.cut_layer, with this node's
    auxiliary classifier when local-loss updates are on."""
    split = process_body(cfg.model.backbone, cfg.split.cut_layer).split
    aux = None
    if cfg.split.local_loss_fraction > 0:
        aux = ClassificationHead(task.backbone.hidden_size, task.num_labels)
        saved = context.state.array_records.get(AUX_STATE_KEY)
        if saved is not None:
            aux.load_state_dict(saved.to_torch_state_dict())
    return SplitPromptModel(model, split, aux)


def save_aux(view: SplitPromptModel, context: Context) -> None:
    if view.aux is not None:
        context.state[AUX_STATE_KEY] = ArrayRecord(view.aux.state_dict())


def split_step(view: SplitPromptModel, cfg: ExperimentConfig, steps: int) -> SplitStep:
    """The step of a round of `steps` local steps: int(local_loss_fraction * steps) of them
    on the local loss, the rest split steps."""
    local = int(cfg.split.local_loss_fraction * steps)
    return SplitStep(view, process_body(cfg.model.backbone, cfg.split.cut_layer), local)


class SplitScorer:
    """EL2N scoring for a split client: head and tail here, the body behind the service,
    forward only. Its smashed traffic and server FLOPs are real costs and are metered."""

    def __init__(self, view: SplitPromptModel, cfg: ExperimentConfig) -> None:
        self.module = view
        self.body = MeteredBody(process_body(cfg.model.backbone, cfg.split.cut_layer))
        self.server_flops = 0.0

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        smashed, full_mask = self.module.cut(input_ids, attention_mask)
        return self.module.tail(self.body.evaluate(smashed, full_mask), attention_mask)

    def client_flops(self, data: TensorDataset) -> float:
        ids, mask, _ = data[0]
        client, server = scoring_flops(self.module, self.body.body, ids, mask)
        self.server_flops = len(data) * server
        return len(data) * client

    def add_costs(self, metrics: dict[str, float | int], selection: pruning.Selection,
                  result: LocalResult, cfg: ExperimentConfig, n_kept: int) -> None:
        """Fold the scoring's traffic and server FLOPs into the round's, and record the
        smashed bytes and server FLOPs pruning saved: the skipped split steps' expected
        cost, at this round's measured cost per split example, minus the scoring's."""
        skipped = _skipped_split_steps(cfg, selection.available, result.steps) * (
            pruning.batch_size(cfg, n_kept))
        traffic = self.body.traffic
        split_examples = max(1, int(metrics["split-examples"]))
        per_example = (metrics["smashed-bytes-up"] + metrics["smashed-bytes-down"]
                       ) / split_examples
        metrics["server-flops-saved"] = (skipped * metrics["server-flops"] / split_examples
                                         - self.server_flops)
        metrics["smashed-bytes-up"] += traffic.bytes_up
        metrics["smashed-bytes-down"] += traffic.bytes_down
        metrics["server-flops"] += self.server_flops
        metrics["scoring-smashed-bytes"] = traffic.bytes_up + traffic.bytes_down
        metrics["smashed-bytes-saved"] = (skipped * per_example
                                          - traffic.bytes_up - traffic.bytes_down)


def _skipped_split_steps(cfg: ExperimentConfig, available: int, steps_taken: int) -> int:
    """Split steps an unpruned client (all `available` examples) would have taken this
    round beyond the pruned one's (expected; local-loss steps send nothing)."""
    def split_steps(steps: int) -> int:
        return steps - int(cfg.split.local_loss_fraction * steps)

    return max(0, split_steps(local_steps(cfg, available)) - split_steps(steps_taken))

