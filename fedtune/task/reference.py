"""The server's own descent direction on its validation rows: the reference of the robust
aggregation's direction check with `aggregation.norm_bound_direction = "validation"`
(`strategies.robust.direction_check`; FLTrust's root-set update, Cao et al. 2021, with the
server's validation rows as the root set).

It is the negative gradient of the task's training loss (the kind's `criterion`, the loss the
clients descend) at the global model, averaged over the first `rows` validation rows, each
tensor scaled by its parameter group's learning rate relative to the base rate
(`TunedModel.param_groups`): the direction of one plain SGD step the server would take there,
in the flat layout of the clients' deltas (`local - global`). Only the direction is used.

What it reads: the validation split, never the test split, and no client's data. No DP
mechanism covers those rows: the released model depends on them through which client rows the
check keeps (docs/privacy.md). Nothing is stored: each round recomputes it from the global
vector, so a resumed run gets the same reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fedtune.task.evaluation import load_vector
from fedtune.task.kinds import task_kind

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig
    from fedtune.task.task import Task
    from fedtune.tuning import TunedModel


class NoValidationError(ValueError):
    """The run asks for the validation reference but the task has no validation rows."""


def reference_rows(task: Task, rows: int) -> int:
    """How many validation rows the reference reads (the split's first `rows`); raises
    `NoValidationError` when the task has none (data.validation_fraction = 0, or a carve
    that found no row)."""
    if task.validation is None or len(task.validation) == 0:
        raise NoValidationError(
            "aggregation.norm_bound_direction='validation' needs the server's validation "
            "split, and this task has none: set data.validation_fraction > 0")
    return min(rows, len(task.validation))


def validation_direction(task: Task, model: TunedModel, vector: np.ndarray,
                         cfg: ExperimentConfig) -> np.ndarray:
    """The server's descent direction at `vector` (float64, the spec's flat layout) on the
    first `cfg.aggregation.direction_reference_rows` validation rows. Leaves `model`
    holding `vector` and no gradients."""
    kind = task_kind(cfg.task.kind)
    n = reference_rows(task, cfg.aggregation.direction_reference_rows)
    split = task.validation
    assert split is not None  # reference_rows checked it
    load_vector(model, task, vector)
    params = model.trainable_state()
    # Each tensor's learning rate over the base one: an SGD step moves it by lr_g x grad.
    scale = {id(p): group["lr"] for group in model.param_groups(1.0) for p in group["params"]}
    criterion = kind.criterion()
    device = next(iter(params.values())).device
    # The kind's forward budget (an LM's logits) bounds a batch, as the clients' step does.
    step = min(cfg.train.eval_batch_size,
               kind.forward_rows(model, split.input_ids.shape[1]) or n, n)
    was_training = model.training
    model.eval()  # no dropout: the direction of the model the clients start from
    for p in params.values():
        p.grad = None
    try:
        with torch.enable_grad():
            for start in range(0, n, max(step, 1)):
                stop = min(start + max(step, 1), n)
                ids, mask, labels = (t.to(device) for t in
                                     split.tensors(np.arange(start, stop)).tensors)
                # The criterion is a batch mean: weighted by the batch's share of the n rows.
                loss = criterion(model(ids, mask), labels) * ((stop - start) / n)
                loss.backward()
        grads = {name: (-scale.get(id(p), 1.0) * p.grad if p.grad is not None
                        else torch.zeros_like(p)) for name, p in params.items()}
        return task.spec.flatten(grads).astype(np.float64)
    finally:
        for p in params.values():
            p.grad = None
        model.train(was_training)
