"""Client side of `el2n_pruning`: score local examples by EL2N under the global model and
keep the highest-scoring fraction. The kept indices live in the client's state until it
rescores, so a pruned client trains on the same subset between scorings."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from fedtune.torch_setup import model_device
from fedtune.tuning import TunedModel

STATE_KEY = "fedtune-el2n"
SCORE_BATCH = 128


@dataclass
class Selection:
    indices: np.ndarray  # into the client's dataset, ascending
    available: int
    rescored: bool
    scoring_flops: float


@torch.inference_mode()
def el2n_scores(model: TunedModel, data: TensorDataset) -> np.ndarray:
    """||softmax(logits) - onehot(label)||_2 per example, one forward pass each."""
    model.eval()
    device = model_device(model)
    ids, mask, labels = (t.to(device) for t in data.tensors)
    scores = []
    for start in range(0, len(labels), SCORE_BATCH):
        sl = slice(start, start + SCORE_BATCH)
        probs = torch.softmax(model(ids[sl], mask[sl]).float(), dim=-1)
        onehot = torch.nn.functional.one_hot(labels[sl], probs.shape[-1]).float()
        scores.append(torch.linalg.vector_norm(probs - onehot, dim=-1).cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def keep_top(scores: np.ndarray, keep: float) -> np.ndarray:
    """Indices of the ceil(keep * n) highest scores (ties: lower index first), ascending."""
    n_keep = max(1, math.ceil(keep * len(scores)))
    order = np.lexsort((np.arange(len(scores)), -scores))
    return np.sort(order[:n_keep])


def select(model: TunedModel, data: TensorDataset, config: ConfigRecord, context: Context,
           server_round: int) -> Selection:
    """The examples to train on this round, rescoring when the rule says so."""
    keep, every = float(config["prune-keep"]), int(config["prune-every"])
    record = context.state.config_records.get(STATE_KEY)
    due = record is None or (every > 0 and server_round - int(record["round"]) >= every)
    if not due:
        return Selection(np.asarray(record["indices"], dtype=np.int64), len(data), False, 0.0)
    indices = keep_top(el2n_scores(model, data), keep)
    context.state[STATE_KEY] = ConfigRecord({"indices": indices.tolist(),
                                             "round": server_round})
    return Selection(indices, len(data), True, len(data) * forward_flops(model, data))


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
