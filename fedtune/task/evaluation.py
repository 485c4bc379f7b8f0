"""The server's central evaluation: which split is read when, and what the summary reports.

- every round: the validation split (`round_metrics`), the figure everything that selects
  reads (the best round, a sweep's choice of settings);
- at the start and the end: the test split (`initial_metrics`, `final_metrics`), for the
  untrained baseline and the released model only, never to choose anything.

Selecting on test accuracy makes the reported test accuracy an optimistic estimate: the
audit found learning rates chosen that way that did not transfer to another corpus.

The untrained model's figures are the same for every run of a task (the seeded initial
vector on the same rows): `untrained_metrics` reads them from the task cache when an earlier
run computed them (`untrained_cache_key` names what they depend on).

Where the frozen-prefix cache applies (`train.prefix_cache`), each split's states entering
the method's first trainable block are computed once (per process, kept on disk) and every
evaluation runs only the blocks after it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedtune.config.runtime import runtime_settings
from fedtune.task import cache as task_cache
from fedtune.task.task import Split
from fedtune.tuning.prefix_cache import cache_applies, process_cache

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig
    from fedtune.task.task import Task
    from fedtune.tuning import TunedModel

log = logging.getLogger(__name__)


def load_vector(model: TunedModel, task: Task, vector: np.ndarray) -> None:
    """Write the flat trainable `vector` into `model`'s trainable tensors."""
    model.load_trainable(task.spec.unflatten(vector))


def _measure(model: TunedModel, split: Split, cfg: ExperimentConfig) -> dict[str, float]:
    states = None
    if cache_applies(cfg, model):
        assert model.prefix is not None  # cache_applies checked it
        n = _examples(split, cfg.train.eval_max_examples)
        states = process_cache(cfg).states(model.prefix, split.input_ids[:n],
                                           split.attention_mask[:n])
    return evaluate(model, split, cfg.train.eval_batch_size, cfg.train.eval_max_examples,
                    states)


def _examples(split: Split, max_examples: int) -> int:
    return len(split) if max_examples <= 0 else min(max_examples, len(split))


@torch.inference_mode()
def evaluate(model: TunedModel, split: Split, batch_size: int, max_examples: int = 0,
             states: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, mean cross-entropy and example count on `split` (its first `max_examples`
    if > 0): the one evaluation loop. With `states` (the split's cached prefix states,
    row for row) the model runs only the blocks above its frozen prefix
    (`forward_from`): same rows, same figures within float tolerance."""
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
    return {"accuracy": correct / n, "loss": loss_sum / n, "examples": float(n)}


def round_metrics(task: Task, model: TunedModel, vector: np.ndarray, cfg: ExperimentConfig
                  ) -> dict[str, float | None]:
    """A round's ledger fields `val_accuracy`, `val_loss`: `vector` on the validation split,
    both None when there is none (data.validation_fraction = 0: no round is evaluated)."""
    if task.validation is None:
        return {"val_accuracy": None, "val_loss": None}
    load_vector(model, task, vector)
    metrics = _measure(model, task.validation, cfg)
    return {"val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"]}


def final_metrics(task: Task, model: TunedModel, vector: np.ndarray, cfg: ExperimentConfig
                  ) -> dict[str, float]:
    """Accuracy, loss and example count of `vector` on the test split: for the final model
    (and the untrained baseline) only."""
    load_vector(model, task, vector)
    return _measure(model, task.test, cfg)


def initial_metrics(task: Task, model: TunedModel, vector: np.ndarray,
                    cfg: ExperimentConfig) -> dict[str, float | None]:
    """The untrained model's baseline: test figures (the final test accuracy is compared
    with them) and validation figures (the round-0 point of the validation curve)."""
    test = final_metrics(task, model, vector, cfg)
    val = round_metrics(task, model, vector, cfg)
    return {"test_accuracy": test["accuracy"], "test_loss": test["loss"], **val}


def untrained_metrics(task: Task, model: TunedModel, cfg: ExperimentConfig
                      ) -> dict[str, float | None]:
    """`initial_metrics` of the task's seeded initial vector, read from the task cache when
    an earlier run of the same task stored them (else computed and stored). `model` may be
    left holding the initial vector or not: callers load the vector they evaluate next."""
    key = untrained_cache_key(task, model, cfg)
    cache_dir = runtime_settings(cfg).cache_dir
    if (cached := task_cache.read_untrained(cache_dir, key)) is not None:
        return cached
    metrics = initial_metrics(task, model, task.initial_vector(), cfg)
    try:
        task_cache.store_untrained(cache_dir, key, metrics)
    except OSError as exc:  # a full or read-only cache costs the next run the evaluation
        log.warning("task cache: could not store the untrained figures under %s: %s",
                    cache_dir, exc)
    return metrics


def untrained_cache_key(task: Task, model: TunedModel, cfg: ExperimentConfig) -> str:
    """The key of the task's untrained figures (`task_cache.untrained_key`): the test and
    validation rows evaluated (their contents, whatever corpus, tokenizer or carve made
    them); the model: the backbone's weights hash, the model table (token length, pruning),
    the method's table, the seed and the spec's hash (the trainable layout); the
    evaluation's batch size, cap and path (the frozen-prefix cache gives equal figures only
    within float tolerance); the thread count and device (a CPU kernel's rounding may follow
    the split of its work)."""
    rows = []
    for split in (task.test, task.validation):
        if split is not None:
            n = _evaluated(len(split), cfg.train.eval_max_examples)
            rows += [split.input_ids[:n], split.attention_mask[:n], split.labels[:n]]
    parameter = next(model.parameters())
    return task_cache.untrained_key(rows, {
        "backbone": task.backbone.hash, "spec": task.spec.hash,
        "model": cfg.to_dict()["model"], "tuning": cfg.tuning.fingerprint(),
        "seed": cfg.seed, "labels": task.num_labels, "validation": task.validation is not None,
        "eval_batch_size": cfg.train.eval_batch_size,
        "eval_max_examples": cfg.train.eval_max_examples,
        "prefix_cache": cache_applies(cfg, model), "threads": torch.get_num_threads(),
        "device": str(parameter.device), "dtype": str(parameter.dtype)})


def _evaluated(rows: int, max_examples: int) -> int:
    """How many of a split's `rows` an evaluation reads (its first ones)."""
    return rows if max_examples <= 0 else min(max_examples, rows)


def validation_examples(task: Task, cfg: ExperimentConfig) -> int:
    """How many validation examples each round's evaluation reads (0 without a split)."""
    n = 0 if task.validation is None else len(task.validation)
    cap = cfg.train.eval_max_examples
    return min(n, cap) if cap > 0 else n


def majority_fields(task: Task, cfg: ExperimentConfig) -> dict[str, Any]:
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
