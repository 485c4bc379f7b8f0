"""Classification as a task: the evaluation loop (accuracy, mean cross entropy), the
summary's accuracy fields and the majority-class baseline (`fedtune.task.kinds` registers
them as the `classification` kind)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig
    from fedtune.task.rows import Split
    from fedtune.tuning import TunedModel

log = logging.getLogger(__name__)


def _examples(split: Split, max_examples: int) -> int:
    return len(split) if max_examples <= 0 else min(max_examples, len(split))


@torch.inference_mode()
def evaluate(model: TunedModel, split: Split, batch_size: int, max_examples: int = 0,
             states: np.ndarray | None = None) -> dict[str, float | None]:
    """Accuracy, mean cross-entropy and example count on `split` (its first `max_examples`
    if > 0): the one evaluation loop. With `states` (the split's cached prefix states,
    row for row) the model runs only the blocks above its frozen prefix
    (`forward_from`): same rows, same figures within float tolerance. A diverged model's
    non-finite loss is null (NaN is not JSON), as the causal-LM kind's."""
    model.eval()
    n = _examples(split, max_examples)
    device = next(model.parameters()).device if states is not None else None
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if states is None:
            ids, mask, labels = split.tensors(np.arange(start, stop)).tensors
            logits = model(ids, mask)
        else:
            hidden = torch.from_numpy(np.array(states[start:stop])).to(device)
            mask = torch.from_numpy(np.asarray(split.attention_mask[start:stop],
                                               dtype=np.int64)).to(device)
            labels = torch.from_numpy(np.asarray(split.labels[start:stop], dtype=np.int64))
            logits = model.forward_from(hidden, mask).cpu()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    loss: float | None = loss_sum / n
    if not math.isfinite(loss):
        # A global vector the clients moved can make the logits overflow: the ledger is
        # strict JSON (run-folder contract), so the record says null and the log says why.
        log.warning("classification evaluation: the cross-entropy is %s on %d examples (the "
                    "model diverged); its loss is recorded as null", loss, n)
        loss = None
    return {"accuracy": correct / n, "loss": loss, "examples": float(n)}


def majority_fields(task: Any, cfg: ExperimentConfig) -> dict[str, Any]:
    """The majority-class baseline: what always answering the most frequent training label
    scores on the rows the run scores (the first `train.eval_max_examples` of the test and
    validation splits). A run that does not beat it learned nothing useful, whatever its
    gain over the untrained model (issue 30: a 3-class run ended at exactly the majority
    rate, 0.69, beside an untrained 0.22).

    The label is counted over the clients' partitions only (the rows that train; never the
    validation rows, never the test split), ties going to the lower label id; with two
    domains over the target clients' partitions (the first `data.target_clients`): the
    accuracy is the target domain's, so is its baseline. No model."""
    partitions = list(task.partitions)
    if cfg.data.domain_by:
        partitions = partitions[:cfg.data.target_clients]
    rows = (np.concatenate(partitions) if partitions
            else np.zeros(0, dtype=np.int64)).astype(np.int64)
    train_labels = np.asarray(task.train.labels)[rows].astype(np.int64)
    label = int(np.bincount(train_labels, minlength=task.num_labels).argmax())

    def accuracy(split: Split | None) -> float | None:
        if split is None:
            return None
        n = _examples(split, cfg.train.eval_max_examples)
        return float(np.mean(np.asarray(split.labels[:n]) == label)) if n else None

    return {"majority_label": task.label_names[label],
            "majority_accuracy": accuracy(task.test),
            "majority_val_accuracy": accuracy(task.validation)}


def accuracy_fields(history: Sequence[dict[str, Any]], initial: dict[str, Any],
                    final_test: dict[str, float], validation_examples: int
                    ) -> dict[str, Any]:
    """The summary's accuracy fields.

    `final_accuracy`/`final_loss`: the final model on the test split. `best_val_accuracy`
    and `best_round`: the best validation accuracy over the rounds and the first round
    that reached it; `best_accuracy` is the same validation figure (kept for readers of
    older summaries, where it was a max over test evaluations). `final_val_accuracy`: the
    final model on the validation split, the figure a sweep ranks settings by. Every
    validation figure is None when the run has no validation split.
    """
    scored = [r for r in history if r.get("val_accuracy") is not None]
    best = max(scored, key=lambda r: r["val_accuracy"], default=None)  # first of equals
    last = history[-1] if history else {}
    return {
        "final_accuracy": final_test["accuracy"],
        "final_loss": final_test["loss"],
        "test_examples": int(final_test["examples"]),
        "initial_accuracy": initial["test_accuracy"],
        "final_val_accuracy": last.get("val_accuracy"),
        "best_val_accuracy": None if best is None else best["val_accuracy"],
        "best_round": None if best is None else best["round"],
        "best_accuracy": None if best is None else best["val_accuracy"],
        "initial_val_accuracy": initial.get("val_accuracy"),
        "validation_examples": validation_examples,
    }
