"""The split-mode client (SFPrompt): the head and tail train here, the frozen body runs
behind a `BodyService`.

A split step: the head's cut-layer states go up, the body's output comes down, the tail
computes the loss and sends the gradient w.r.t. the body output up, and the gradient at the
cut comes down and finishes the backward through the head. What goes up is per-example
data: the cut-layer states carry the text (at cut 0 they are the token embeddings) and the
body-output gradients carry the labels (their direction against the tail the server sent
flips with the label). Without `split.smashed_dp` the server sees both in clear, and DP-SGD's
epsilon covers the deltas only; with it, every row that goes up is clipped and noised
(`fedtune.split.smashed_dp`) and each split step is accounted into the client's epsilon
(`SplitStep.privacy_events`, `fedtune.split.plan`; audit: `fedtune audit split`).

Under DP-SGD the head and tail run inside the Opacus-wrapped model, so their per-sample
gradients are captured by its hooks as usual; the server's gradient enters through
`smashed.backward(grad)`, which the hooks see like any other backward. Clipping and noise
then cover prompt and tail jointly.

A local-loss step trains the prompt against a small auxiliary classifier on the cut-layer
features without any traffic. It is the client's own: kept in the node's state between
rounds, never federated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Context
from torch import nn
from torch.utils.data import TensorDataset

from clients.plugins import el2n as pruning
from clients.train import LocalResult, local_steps
from fedtune.config import ExperimentConfig
from fedtune.config.pruning import PruneKey, prune_key
from fedtune.models import load_backbone
from fedtune.privacy.randomness import dp_source
from fedtune.split import (
    BodyService,
    InProcessBody,
    MeteredBody,
    SplitFlops,
    scoring_flops,
    split_flops,
)
from fedtune.split.cut import SplitBackbone
from fedtune.split.model import SplitParts, split_view_of
from fedtune.split.plan import smashed_plan
from fedtune.split.smashed_dp import SmashedNoise, clip_rows
from fedtune.task.kinds import task_kind
from fedtune.task.task import Task
from fedtune.tuning import TunedModel
from fedtune.tuning.base import ClassificationHead

AUX_STATE_KEY = "fedtune-split-aux"


@functools.lru_cache(maxsize=2)
def process_body(backbone: str, prune: PruneKey, cut_layer: int, tail_layers: int = 0,
                 model_kind: str = "classification") -> InProcessBody:
    """One body per process, on the process-wide (pruned) backbone the task loaded for its
    kind (a causal LM's keeps its LM head, which the tail runs), shared by its virtual
    clients (a Ray actor serves one client at a time)."""
    model = load_backbone(backbone, prune, model_kind).model
    return InProcessBody(SplitBackbone(model, cut_layer, tail_layers))


def config_body(cfg: ExperimentConfig) -> InProcessBody:
    """`process_body` of `cfg`: its backbone as `model.prune_layers` leaves it, cut at
    `split.cut_layer` (an index among the kept layers) with `split.tail_layers` after it."""
    return process_body(cfg.model.backbone, prune_key(cfg.model.prune_layers),
                        cfg.split.cut_layer, cfg.split.tail_layers,
                        task_kind(cfg.task.kind).model_kind)


class SplitStep:
    """The `LocalStep` of split mode: the first `local_loss_steps` steps of a round train
    on the local loss, the rest are split steps through `body`. With `noise` (smashed DP)
    every row that goes up is clipped and noised, and each split step is a privacy event."""

    def __init__(self, view: SplitParts, body: BodyService, local_loss_steps: int,
                 smashed: SmashedRelease | None = None) -> None:
        self.view = view
        self.body = MeteredBody(body)
        # The FLOP probe (synthetic text, fedtune.split.flops) crosses the same wire: it
        # is metered too, on its own meter (it runs once per process, not per round).
        self.probe = MeteredBody(body)
        self.local_loss_steps = local_loss_steps
        self.smashed = smashed
        self.examples = {"split": 0, "local": 0}
        self.steps = {"split": 0, "local": 0}
        # Rows the body ran on: the examples, plus smashed DP's dummy rows.
        self.body_rows = 0
        self._next_index = 0
        # Where the last split step's examples sat among the rows sent (an auditor's
        # ground truth; the server is not told).
        self.last_slots: torch.Tensor | None = None
        self._row_shape: tuple[int, ...] | None = None
        self._flops: SplitFlops | None = None
        # Every tensor stays trainable until the first step: Opacus only hooks modules
        # that are trainable when it wraps the model.
        view.set_phase(local_loss=None)

    def __call__(self, model: nn.Module, criterion: nn.Module, ids: torch.Tensor,
                 mask: torch.Tensor, labels: torch.Tensor, index: int) -> torch.Tensor:
        self._release_skipped(index, ids)
        self._next_index = index + 1
        local = index < self.local_loss_steps
        self.view.set_phase(local_loss=local)
        kind = "local" if local else "split"
        self.examples[kind] += int(labels.shape[0])  # examples (an LM's labels are [B, T])
        self.steps[kind] += 1
        if local:
            loss = criterion(self.view.aux_logits(*self.view.cut(ids, mask)), labels)
            loss.backward()
            return loss.detach()
        if self.smashed is not None:
            return self._private_split_step(criterion, ids, mask, labels)
        return self._split_step(criterion, ids, mask, labels)

    def _split_step(self, criterion: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
        smashed, full_mask = self.view.cut(ids, mask)
        output = self.body.forward(smashed.detach(), full_mask).requires_grad_(True)
        self.body_rows += int(labels.shape[0])
        self.last_slots = torch.arange(int(labels.shape[0]))
        loss = criterion(self.view.tail(output, full_mask, mask), labels)
        loss.backward()  # tail gradients, and output.grad to send up
        smashed.backward(self.body.backward(output.grad))
        return loss.detach()

    def _private_split_step(self, criterion: nn.Module, ids: torch.Tensor,
                            mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        noise = self.smashed.noise
        b = int(labels.shape[0])
        smashed, full_mask = self.view.cut(ids, mask)
        self._row_shape = tuple(smashed.shape[1:])
        # Clipped inside the graph, so the head back-propagates through the clipping.
        clipped = clip_rows(smashed, noise.activation_clip)
        slots = noise.place(b)
        self.last_slots = slots
        sent = noise.activations(clipped, slots)
        output = self.body.forward(sent, noise.mask(sent.shape[1], full_mask))
        self.body_rows += noise.slots
        mine = output[slots].detach().requires_grad_(True)
        # The tail runs here, with the real mask: the all-ones one went to the body only.
        loss = criterion(self.view.tail(mine, full_mask, mask), labels)
        loss.backward()
        # The loss is the batch mean: b x the gradient is each example's own, which is
        # what the clip bounds. The server's answer is scaled back locally.
        grad_cut = self.body.backward(noise.gradients(mine.grad * b, slots))
        clipped.backward(grad_cut[slots] / b)
        return loss.detach()

    def _release_skipped(self, upto: int, like: torch.Tensor) -> None:
        """Split steps local_train skipped (an empty Poisson batch) still send their rows
        under smashed DP: a missing exchange would tell the server the batch was empty."""
        if self.smashed is None:
            return
        for index in range(self._next_index, upto):
            if index < self.local_loss_steps:
                continue
            if self._row_shape is None:
                ids = torch.zeros((1, like.shape[1]), dtype=like.dtype, device=like.device)
                with torch.no_grad():
                    smashed, _ = self.view.cut(ids, torch.ones_like(ids))
                self._row_shape = tuple(smashed.shape[1:])
            noise = self.smashed.noise
            ref = next(self.view.prompt.parameters())
            rows = noise.dummy(self._row_shape, noise.activation_clip, ref.detach())
            self.body.forward(rows, noise.mask(rows.shape[1], like))
            self.body.backward(noise.dummy(self._row_shape, noise.gradient_clip, ref.detach()))
            self.body_rows += noise.slots
            self.steps["split"] += 1
        self._next_index = max(self._next_index, upto)

    def privacy_events(self) -> list[tuple[float, float, int]]:
        """This round's smashed-data releases as (noise multiplier, sample rate, steps):
        one joint event per split step (see fedtune.split.smashed_dp); none when the
        smashed data goes up in clear (then no epsilon covers it)."""
        if self.smashed is None or self.steps["split"] == 0:
            return []
        return [(self.smashed.joint_multiplier, self.smashed.sample_rate,
                 self.steps["split"])]

    def flops(self, model: nn.Module, data: TensorDataset, examples: int) -> float:
        if self.smashed is not None:
            ids = data[0][0].unsqueeze(0)
            self._release_skipped(self.smashed.total_steps, ids)
        self._flops = self._measure(data)
        # Training is over: every tensor trainable again, so trainable_state() is whole.
        self.view.set_phase(local_loss=None)
        return (self.examples["split"] * self._flops.client_split
                + self.examples["local"] * self._flops.client_local)

    def _measure(self, data: TensorDataset) -> SplitFlops:
        # The sequence length only: the measurement runs on a synthetic probe.
        return split_flops(self.view, self.probe, int(data.tensors[0].shape[1]))

    def extras(self) -> dict[str, float]:
        traffic = self.body.traffic
        flops = self._flops
        if flops is None:
            raise RuntimeError("extras() before flops(): local_train counts FLOPs first")
        return {
            "smashed-bytes-up": traffic.bytes_up,
            "smashed-bytes-down": traffic.bytes_down,
            "server-flops": self.body_rows * flops.server,
            "split-steps": self.steps["split"],
            "local-loss-steps": self.steps["local"],
            "split-examples": self.examples["split"],
            "local-loss-examples": self.examples["local"],
            "client-flops-per-example": flops.client_split,
            "full-model-flops-per-example": flops.full,
            "probe-bytes": self.probe.traffic.bytes_up + self.probe.traffic.bytes_down,
        }


def split_view(model: TunedModel, task: Task, cfg: ExperimentConfig, context: Context
               ) -> SplitParts:
    """The client's training view of `model` (`fedtune.split.model`: the view registered
    for its class) cut at split.cut_layer, with this node's auxiliary classifier when
    local-loss updates are on."""
    split = config_body(cfg).split
    aux = None
    if cfg.split.local_loss_fraction > 0:
        aux = ClassificationHead(task.backbone.hidden_size, task.num_labels)
        saved = context.state.array_records.get(AUX_STATE_KEY)
        if saved is not None:
            aux.load_state_dict(saved.to_torch_state_dict())
    return split_view_of(model, split, aux)  # type: ignore[return-value]


def save_aux(view: SplitParts, context: Context) -> None:
    if view.aux is not None:
        context.state[AUX_STATE_KEY] = ArrayRecord(view.aux.state_dict())


def split_step(view: SplitParts, cfg: ExperimentConfig, steps: int,
               n: int | None = None, seed: int | None = None) -> SplitStep:
    """The step of a round of `steps` local steps: int(local_loss_fraction * steps) of them
    on the local loss, the rest split steps. Smashed DP needs the client's example count
    `n` (its sample rate and noise) and, in reproducible-noise mode only, its `seed`."""
    local = int(cfg.split.local_loss_fraction * steps)
    body = config_body(cfg)
    if not cfg.split.smashed_dp.enabled:
        return SplitStep(view, body, local)
    if n is None:
        raise ValueError("split.smashed_dp.enabled=true: split_step needs the client's "
                         "example count (n=len(data)) to set its sample rate and noise")
    reproducible = None
    if cfg.privacy.reproducible_noise:
        if seed is None:
            raise ValueError("privacy.reproducible_noise=true: split_step needs the client's "
                             "seed to derive the smashed-data noise from")
        reproducible = seed
    plan = smashed_plan(cfg, n)
    device = next(view.prompt.parameters()).device
    noise = SmashedNoise(plan.sigma, cfg.split.smashed_dp.activation_clip_norm,
                         cfg.split.smashed_dp.gradient_clip_norm, plan.slots,
                         dp_source("smashed", reproducible), device)
    release = SmashedRelease(noise, plan.joint_multiplier, plan.sample_rate, steps)
    return SplitStep(view, body, local, release)


@dataclass(frozen=True)
class SmashedRelease:
    """A round's smashed-DP setting on the client: the noise, the accounted event and the
    round's step count (to release skipped steps' rows at its end)."""

    noise: SmashedNoise
    joint_multiplier: float
    sample_rate: float
    total_steps: int


class SplitScorer:
    """EL2N scoring for a split client: head and tail here, the body behind the service,
    forward only. Its smashed traffic and server FLOPs are real costs and are metered."""

    def __init__(self, view: SplitParts, cfg: ExperimentConfig) -> None:
        self.module = view
        self.body = MeteredBody(config_body(cfg))
        self.probe = MeteredBody(self.body.body)  # the FLOP probe's own meter
        self.server_flops = 0.0

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        smashed, full_mask = self.module.cut(input_ids, attention_mask)
        return self.module.tail(self.body.evaluate(smashed, full_mask), full_mask,
                                attention_mask)

    def client_flops(self, data: TensorDataset) -> float:
        # Measured on a synthetic probe through the metered body: no client row leaves.
        client, server = scoring_flops(self.module, self.probe, int(data.tensors[0].shape[1]))
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
        metrics["probe-bytes"] += self.probe.traffic.bytes_up + self.probe.traffic.bytes_down
        metrics["smashed-bytes-saved"] = (skipped * per_example
                                          - traffic.bytes_up - traffic.bytes_down)


def _skipped_split_steps(cfg: ExperimentConfig, available: int, steps_taken: int) -> int:
    """Split steps an unpruned client (all `available` examples) would have taken this
    round beyond the pruned one's (expected; local-loss steps send nothing)."""
    def split_steps(steps: int) -> int:
        return steps - int(cfg.split.local_loss_fraction * steps)

    return max(0, split_steps(local_steps(cfg, available)) - split_steps(steps_taken))

