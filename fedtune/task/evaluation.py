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
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedtune.config.runtime import runtime_settings
from fedtune.task import cache as task_cache
from fedtune.task import lm
from fedtune.task.classification import (  # noqa: F401  (their former home: re-exported)
    _examples,
    accuracy_fields,
    evaluate,
    majority_fields,
)
from fedtune.task.kinds import round_quality, task_kind
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


def _measure(model: TunedModel, split: Split, cfg: ExperimentConfig
             ) -> dict[str, float | None]:
    """The task kind's evaluation of `model` on `split` (`fedtune.task.kinds`)."""
    states = None
    if cache_applies(cfg, model):
        assert model.prefix is not None  # cache_applies checked it
        n = _examples(split, cfg.train.eval_max_examples)
        states = process_cache(cfg).states(model.prefix, split.input_ids[:n],
                                           split.attention_mask[:n])
    return task_kind(cfg.task.kind).evaluate(model, split, cfg.train.eval_batch_size,
                                             cfg.train.eval_max_examples, states)


def round_metrics(task: Task, model: TunedModel, vector: np.ndarray, cfg: ExperimentConfig
                  ) -> dict[str, float | None]:
    """A round's ledger fields `val_accuracy`, `val_loss`, `val_perplexity`: `vector` on the
    validation split, all None when there is none (data.validation_fraction = 0: no round
    is evaluated); a field the task kind does not compute is None (a classifier's
    perplexity, a language model's accuracy)."""
    if task.validation is None:
        return round_quality({})
    load_vector(model, task, vector)
    return round_quality(_measure(model, task.validation, cfg))


def final_metrics(task: Task, model: TunedModel, vector: np.ndarray, cfg: ExperimentConfig
                  ) -> dict[str, float | None]:
    """Accuracy (or perplexity), loss and example count of `vector` on the test split: for
    the final model (and the untrained baseline) only."""
    load_vector(model, task, vector)
    extras = task_kind(cfg.task.kind).final_extras(model, task.test, task.backbone.tokenizer,
                                                   cfg)
    return {**_measure(model, task.test, cfg), **extras}


def initial_metrics(task: Task, model: TunedModel, vector: np.ndarray,
                    cfg: ExperimentConfig) -> dict[str, float | None]:
    """The untrained model's baseline: test figures (the final test accuracy is compared
    with them) and validation figures (the round-0 point of the validation curve)."""
    test = final_metrics(task, model, vector, cfg)
    val = round_metrics(task, model, vector, cfg)
    # The fields the untrained-figures cache keeps (a perplexity is the exp of its loss).
    return {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "val_accuracy": val["val_accuracy"], "val_loss": val["val_loss"],
            "test_rouge_l": test.get("rouge_l")}


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
    them) and the texts of the kind's final figures (an LM's ROUGE-L); the model: the
    backbone's weights hash, the model table (token length, pruning), the method's table,
    the seed and the spec's hash (the trainable layout); the evaluation's batch size, cap
    and path (the frozen-prefix cache gives equal figures only within float tolerance); the
    thread count and device (a CPU kernel's rounding may follow the split of its work); the
    ROUGE library that scores generations, where importable."""
    rows = []
    for split in (task.test, task.validation):
        if split is not None:
            n = _evaluated(len(split), cfg.train.eval_max_examples)
            rows += [split.input_ids[:n], split.attention_mask[:n], split.labels[:n]]
    # The final figures the kind computes on other texts (an LM's ROUGE-L scans the whole
    # test split for texts long enough), each as its own array.
    rows += task_kind(cfg.task.kind).final_texts(task.test, task.backbone, cfg)
    parameter = next(model.parameters())
    return task_cache.untrained_key(rows, {
        "backbone": task.backbone.hash, "spec": task.spec.hash,
        "model": cfg.to_dict()["model"], "task": cfg.to_dict()["task"],
        "tuning": cfg.tuning.fingerprint(),
        "seed": cfg.seed, "labels": task.num_labels, "validation": task.validation is not None,
        "eval_batch_size": cfg.train.eval_batch_size,
        "eval_max_examples": cfg.train.eval_max_examples,
        "prefix_cache": cache_applies(cfg, model), "threads": torch.get_num_threads(),
        "device": str(parameter.device), "dtype": str(parameter.dtype),
        # Whether (and which) rouge-score computes test_rouge_l: a null stored for want of
        # it is not served once it is installed.
        "rouge_score": lm.rouge_library()})


def _evaluated(rows: int, max_examples: int) -> int:
    """How many of a split's `rows` an evaluation reads (its first ones)."""
    return rows if max_examples <= 0 else min(max_examples, rows)


def validation_examples(task: Task, cfg: ExperimentConfig) -> int:
    """How many validation examples each round's evaluation reads (0 without a split)."""
    n = 0 if task.validation is None else len(task.validation)
    cap = cfg.train.eval_max_examples
    return min(n, cap) if cap > 0 else n

