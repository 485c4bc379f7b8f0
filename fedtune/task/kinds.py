"""The task kinds, by name (`[task] kind`; their config rules are `fedtune.config.task`): what
differs between learning a classifier and a language model, in one object per kind, so the
task, the client step, the server's evaluation and the ledger ask the kind instead of
branching on it.

Every ledger field of every kind is written by every run: a classifier's perplexity fields
and a language model's accuracy and majority fields are `null`, never missing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from fedtune.task import classification, lm
from fedtune.task.positions import check_lm_positions

if TYPE_CHECKING:
    import datasets

    from fedtune.config import ExperimentConfig

# The per-round and summary fields of the causal-LM kind, null for a classifier.
ROUND_PERPLEXITY = "val_perplexity"
SUMMARY_PERPLEXITY = ("test_perplexity", "test_loss", "test_tokens", "initial_test_perplexity",
                      "initial_val_perplexity", "final_val_perplexity", "best_val_perplexity",
                      "test_rouge_l", "initial_test_rouge_l")
NO_BASELINE = {"majority_label": None, "majority_accuracy": None, "majority_val_accuracy": None}


@dataclass(frozen=True)
class TaskKind:
    name: str
    # Rows carry no label (the texts are the targets): the corpus is loaded without one.
    unlabelled: bool
    # The auto class the backbone loads with (`fedtune.models.backbone.AUTO_CLASSES` key).
    model_kind: str
    # The tokenizer made ready for this kind (in place), before any text is tokenized.
    prepare_tokenizer: Callable[[Any], None]
    # (backbone, config): raises ConfigError where the config asks for what the loaded
    # backbone cannot do (a causal LM's positions), before any text is tokenized.
    check_backbone: Callable[[Any, ExperimentConfig], None]
    # The corpus' rows this kind trains and tests on.
    select_rows: Callable[[datasets.DatasetDict, ExperimentConfig], datasets.DatasetDict]
    # A split's label array from its dataset and its token arrays.
    targets: Callable[[datasets.Dataset, np.ndarray, np.ndarray], np.ndarray]
    # The class names (empty for a kind without classes).
    label_names: Callable[[datasets.Dataset], tuple[str, ...]]
    # What the validation carve stratifies by, one value per row.
    strata: Callable[[np.ndarray], np.ndarray]
    # The client's training loss: criterion(model(ids, mask), labels) -> scalar (batch mean
    # of per-example losses, as Opacus' per-sample clipping expects).
    criterion: Callable[[], nn.Module]
    # (model, split, batch_size, max_examples, prefix states) -> accuracy, loss, ...
    evaluate: Callable[..., dict[str, float | None]]
    # (model, test split, tokenizer, config) -> figures measured on the final model and its
    # untrained baseline only (a language model's generation quality).
    final_extras: Callable[..., dict[str, float | None]]
    # (test split, backbone, config) -> the token arrays `final_extras` reads, which the
    # evaluation's first rows may not hold (the untrained-figures cache keys on them).
    final_texts: Callable[[Any, Any, ExperimentConfig], list[np.ndarray]]
    # The summary's quality fields from the rounds, the untrained figures and the final test.
    summary_fields: Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any],
                              Mapping[str, Any], int], dict[str, Any]]
    # The baseline a run must beat, from the task (majority class; none for an LM).
    baseline: Callable[[Any, ExperimentConfig], dict[str, Any]]  # (the Task, its config)
    # (tuned model, config) -> None, or a ConfigError: what the built model cannot run,
    # refused when the task is built, before any round (an LM row's logits past the
    # budget; split mode's batch past it).
    check_model: Callable[[Any, ExperimentConfig], None] = lambda model, cfg: None
    # (tuned model, row length) -> the rows one training forward may hold, or None (no
    # bound): a client's step cuts a larger batch into parts (an LM's logits budget).
    forward_rows: Callable[[Any, int], int | None] = lambda model, length: None


_KINDS: dict[str, TaskKind] = {}


def register_task_kind(kind: TaskKind) -> TaskKind:
    if kind.name in _KINDS:
        raise ValueError(f"task kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def task_kind(name: str) -> TaskKind:
    """The kind registered as `name` (the config has checked it is one)."""
    if name not in _KINDS:
        raise ValueError(f"task.kind={name!r} is not one of: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def round_quality(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """A round's validation fields from an evaluation (None without a validation split)."""
    return {"val_accuracy": metrics.get("accuracy"), "val_loss": metrics.get("loss"),
            ROUND_PERPLEXITY: metrics.get("perplexity")}


def _classification_summary(history: Sequence[Mapping[str, Any]], initial: Mapping[str, Any],
                            final_test: Mapping[str, Any], validation_examples: int
                            ) -> dict[str, Any]:
    return {**classification.accuracy_fields(list(history), dict(initial), dict(final_test),
                                             validation_examples),
            **dict.fromkeys(SUMMARY_PERPLEXITY)}


def _lm_summary(history: Sequence[Mapping[str, Any]], initial: Mapping[str, Any],
                final_test: Mapping[str, Any], validation_examples: int) -> dict[str, Any]:
    """The best round is the lowest validation perplexity (the first of equals), never a
    test figure; the untrained model's perplexities are the exp of its token-weighted
    losses (what the untrained-figures cache keeps)."""
    scored = [r for r in history if r.get(ROUND_PERPLEXITY) is not None]
    best = min(scored, key=lambda r: r[ROUND_PERPLEXITY], default=None)
    last = history[-1] if history else {}
    return {
        "final_accuracy": None, "final_loss": final_test["loss"],
        "test_examples": int(final_test["examples"]), "initial_accuracy": None,
        "final_val_accuracy": None, "best_val_accuracy": None,
        "best_round": None if best is None else best["round"], "best_accuracy": None,
        "initial_val_accuracy": None, "validation_examples": validation_examples,
        "test_perplexity": final_test["perplexity"], "test_loss": final_test["loss"],
        "test_tokens": int(final_test["tokens"]),
        "initial_test_perplexity": lm.perplexity(initial.get("test_loss")),
        "initial_val_perplexity": lm.perplexity(initial.get("val_loss")),
        "final_val_perplexity": last.get(ROUND_PERPLEXITY),
        "best_val_perplexity": None if best is None else best[ROUND_PERPLEXITY],
        "test_rouge_l": final_test.get("rouge_l"),
        "initial_test_rouge_l": initial.get("test_rouge_l"),
    }


def _class_label_names(ds: datasets.Dataset) -> tuple[str, ...]:
    """The ClassLabel names, or the label ids as strings when the corpus has none."""
    feature = ds.features["label"]
    names = getattr(feature, "names", None)
    if names:
        return tuple(str(n) for n in names)
    return tuple(str(i) for i in range(int(max(ds["label"])) + 1))


register_task_kind(TaskKind(
    name="classification", unlabelled=False, model_kind="classification",
    prepare_tokenizer=lambda tokenizer: None,
    check_backbone=lambda backbone, cfg: None,
    select_rows=lambda corpus, cfg: corpus,
    targets=lambda ds, ids, mask: np.asarray(ds["label"], dtype=np.int64),
    label_names=_class_label_names,
    strata=lambda labels: labels,
    criterion=nn.CrossEntropyLoss,
    evaluate=classification.evaluate,
    final_extras=lambda model, split, tokenizer, cfg: {},
    final_texts=lambda split, backbone, cfg: [],
    summary_fields=_classification_summary,
    baseline=classification.majority_fields,
))

register_task_kind(TaskKind(
    name="causal_lm", unlabelled=True, model_kind="causal_lm",
    prepare_tokenizer=lm.prepare_tokenizer,
    check_backbone=check_lm_positions,
    select_rows=lm.select_rows,
    targets=lambda ds, ids, mask: lm.lm_targets(ids, mask),
    label_names=lambda ds: (),
    # One stratum: a text has no class; the carve is a seeded share of all rows.
    strata=lambda labels: np.zeros(len(labels), dtype=np.int64),
    criterion=lm.NextTokenLoss,
    evaluate=lm.evaluate_lm,
    final_extras=lm.generation_quality,
    final_texts=lambda split, backbone, cfg: lm.generation_texts(split, backbone.tokenizer,
                                                                 cfg),
    summary_fields=_lm_summary,
    baseline=lambda task, cfg: dict(NO_BASELINE),
    check_model=lm.check_training_budget,
    forward_rows=lm.rows_within_budget,
))
