"""Client side of `el2n_pruning`: score local examples by EL2N under the global model and
keep the highest-scoring fraction. The kept indices live in the client's state until it
rescores, so a pruned client trains on the same subset between scorings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from clients.train import LocalResult, local_steps
from fedtune.config import ExperimentConfig
from fedtune.runtime.torch_setup import model_device
from fedtune.tuning import TunedModel
from fedtune.wire.protocol import PruneSettings

STATE_KEY = "fedtune-el2n"
SCORE_BATCH = 128


@dataclass
class Selection:
    indices: np.ndarray  # into the client's dataset, ascending
    available: int
    rescored: bool
    scoring_flops: float  # on this client


class Scorer(Protocol):
    """How a client gets logits for scoring: the whole model here, or a split pipeline."""

    module: nn.Module  # the client-side model: its device and train/eval mode

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ...

    def client_flops(self, data: TensorDataset) -> float:
        """This client's FLOPs for scoring all of `data` once."""
        ...

    def add_costs(self, metrics: dict[str, float | int], selection: Selection,
                  result: LocalResult, cfg: ExperimentConfig, n_kept: int) -> None:
        """Fold what scoring cost beyond this client's FLOPs into the round's metrics."""
        ...


class ModelScorer:
    """Scoring with the whole tuned model on the client."""

    def __init__(self, model: TunedModel) -> None:
        self.module = model

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids, attention_mask)

    def client_flops(self, data: TensorDataset) -> float:
        return len(data) * forward_flops(self.module, data)

    def add_costs(self, metrics: dict[str, float | int], selection: Selection,
                  result: LocalResult, cfg: ExperimentConfig, n_kept: int) -> None:
        """Nothing crosses the network to score here: `round_metrics` has it all."""


@torch.no_grad()
def el2n_scores(scorer: Scorer | TunedModel, data: TensorDataset) -> np.ndarray:
    """||softmax(logits) - onehot(label)||_2 per example, one forward pass each."""
    if isinstance(scorer, nn.Module):
        scorer = ModelScorer(scorer)
    device = model_device(scorer.module)
    ids, mask, labels = (t.to(device) for t in data.tensors)
    scores = []
    for start in range(0, len(labels), SCORE_BATCH):
        sl = slice(start, start + SCORE_BATCH)
        probs = torch.softmax(scorer.logits(ids[sl], mask[sl]).float(), dim=-1)
        onehot = torch.nn.functional.one_hot(labels[sl], probs.shape[-1]).float()
        scores.append(torch.linalg.vector_norm(probs - onehot, dim=-1).cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def keep_top(scores: np.ndarray, keep: float) -> np.ndarray:
    """Indices of the ceil(keep * n) highest scores (ties: lower index first), ascending."""
    n_keep = PruneSettings(keep, every=0).kept(len(scores))
    order = np.lexsort((np.arange(len(scores)), -scores))
    return np.sort(order[:n_keep])


def select(scorer: Scorer, data: TensorDataset, settings: PruneSettings, context: Context,
           server_round: int) -> Selection:
    """The examples to train on this round, rescoring when the rule says so."""
    keep, every = settings.keep, settings.every
    record = context.state.config_records.get(STATE_KEY)
    due = record is None or (every > 0 and server_round - int(record["round"]) >= every)
    if not due:
        return Selection(np.asarray(record["indices"], dtype=np.int64), len(data), False, 0.0)
    was_training = scorer.module.training
    scorer.module.eval()
    try:
        indices = keep_top(el2n_scores(scorer, data), keep)
    finally:
        scorer.module.train(was_training)
    context.state[STATE_KEY] = ConfigRecord({"indices": indices.tolist(),
                                             "round": server_round})
    return Selection(indices, len(data), True, scorer.client_flops(data))


_FORWARD_FLOPS: dict[tuple[str, int, int], float] = {}


def forward_flops(model: TunedModel, data: TensorDataset) -> float:
    """FLOPs of one example's forward pass (torch's FlopCounterMode), cached per shape."""
    ids, mask, _ = (t.to(model_device(model)) for t in data[0])
    key = (model.method, model.num_trainable(), int(ids.shape[0]))
    if key not in _FORWARD_FLOPS:
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            model(ids.unsqueeze(0), mask.unsqueeze(0))
        _FORWARD_FLOPS[key] = float(counter.get_total_flops())
    return _FORWARD_FLOPS[key]


def round_metrics(selection: Selection, result: LocalResult, cfg: ExperimentConfig,
                  n_kept: int) -> dict[str, float | int]:
    """What pruning changed this round. FLOPs saved are expected values: the steps an
    unpruned client would take, at the measured per-example cost, minus scoring."""
    per_example = result.flops / max(1, result.examples_seen)
    skipped = (local_steps(cfg, selection.available) - result.steps) * batch_size(cfg, n_kept)
    return {
        "examples-available": selection.available,
        "examples-kept": n_kept,
        "rescored": int(selection.rescored),
        "scoring-flops": selection.scoring_flops,
        "flops-saved": skipped * per_example - selection.scoring_flops,
    }


def batch_size(cfg: ExperimentConfig, n_kept: int) -> int:
    """The batch a client with `n_kept` examples trains on (as `local_train` draws it)."""
    return min(cfg.train.batch_size, n_kept)
