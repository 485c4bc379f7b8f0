"""Which examples a SuperNode trains on: its share of the experiment's corpus (node config
`partition-id`), or its own file (node config `data-path`, JSON lines). The partition id is
the client's identity either way: its cohort draws, seeds and DP history are keyed by it.
Which node holds which partition is not the node's say: the simulation engine writes
`partition-id` into each node's config, and a deployment's server checks each claim against
its operator roster (`strategies.discovery`). A node with its own file tells the server the
file's example count once, at discovery (`own_example_count`); the server weights it and
plans its DP charges by that count for the whole run, sends it back in every train
instruction, and the node trains only when its data still has exactly that many rows
(`training_data`): a file edited between discovery and a round is refused, not trained on at
a sample rate the server never charged.

What a line of the file holds is the task kind's: a classifier's lines each carry a `text`
and a `label`; a language model's (`task.kind = "causal_lm"`) a `text` only, the texts being
their own targets. A `label` in a language model's file is refused, not ignored: such a file
is a classifier's (the corpus path's own rule, SpamAssassin's ham only, is not applied to a
node's file, so its spam would be trained on as the user's writing). Either way the rows are
tokenized and given their targets exactly as the task's own corpus rows are (the task's
prepared tokenizer, `tokenize_texts`, the kind's `targets`, `Split.tensors`): the same text
gives the same tensors from a node's file and from the corpus."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch.utils.data import TensorDataset

from fedtune.data import tokenize_texts
from fedtune.data.predict_input import PredictInputError, read_rows, read_texts
from fedtune.task.kinds import task_kind
from fedtune.task.lm import IGNORE
from fedtune.task.rows import Split
from fedtune.task.task import Task

DATA_PATH_KEY = "data-path"
PARTITION_KEY = "partition-id"


def node_partition(node_config: Mapping[str, object]) -> int:
    """The partition id this SuperNode was started with (node config `partition-id`)."""
    if PARTITION_KEY not in node_config:
        raise KeyError(f"node config has no {PARTITION_KEY}: start the SuperNode with "
                       f'--node-config "{PARTITION_KEY}=<id>"')
    return int(node_config[PARTITION_KEY])  # type: ignore[call-overload]


def has_own_data(node_config: Mapping[str, object]) -> bool:
    """Whether this node trains on its own file (node config `data-path`)."""
    path = node_config.get(DATA_PATH_KEY)
    return path is not None and path != ""


def own_example_count(node_config: Mapping[str, object], task: Task) -> int | None:
    """The examples this node trains on when it has its own file (the rows `node_data`
    reads from it), else None: the server knows a corpus partition's size itself."""
    if not has_own_data(node_config):
        return None
    return len(node_data(node_config, task, node_partition(node_config)))


class ExampleCountError(ValueError):
    """The node's data holds another number of rows than the server charges it for."""


def training_data(node_config: Mapping[str, object], task: Task, partition_id: int,
                  examples: int | None) -> TensorDataset:
    """The rows this node trains on this round, checked against `examples`, the count the
    server holds for it (from the instruction). A node with its own file must be sent one:
    without it the server's charge and the node's sample rate could disagree unseen."""
    data = node_data(node_config, task, partition_id)
    if examples is None:
        if has_own_data(node_config):
            raise ExampleCountError(
                f"node config {DATA_PATH_KEY}: the train instruction carries no example "
                "count; refusing to train on a count the server did not charge")
        return data
    if len(data) != examples:
        raise ExampleCountError(
            f"partition {partition_id} holds {len(data)} training examples, the server "
            f"charges it for {examples} (the count fixed at discovery); refusing to train "
            "(restart the run after changing a node's data)")
    return data


def node_data(node_config: Mapping[str, object], task: Task, partition_id: int
              ) -> TensorDataset:
    if not has_own_data(node_config):
        return task.client_data(partition_id)
    path = node_config[DATA_PATH_KEY]
    file = Path(str(path)).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"node config {DATA_PATH_KEY}={path!r}: no such file")
    stat = file.stat()
    # A long-lived ClientApp process tokenizes the node's file once, not every round; a
    # changed file or another backbone/length/kind/label set is read again.
    key = (str(file), stat.st_mtime_ns, stat.st_size, task.backbone.hash,
           task.cfg.model.max_length, task.cfg.task.kind, task.label_names)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _load(file, task)
    return _CACHE[key]


_CACHE: dict[tuple, TensorDataset] = {}


def _load(file: Path, task: Task) -> TensorDataset:
    kind = task_kind(task.cfg.task.kind)
    if file.suffix != ".jsonl":
        line = '{"text": ...}' if kind.unlabelled else '{"text": ..., "label": ...}'
        raise PredictInputError(f"node config {DATA_PATH_KEY}={str(file)!r}: expected a "
                                f".jsonl file of {line} lines")
    lines, texts, columns = (_texts_only if kind.unlabelled else _labelled)(file, task)
    tok = tokenize_texts(texts, task.backbone.tokenizer, task.cfg.model.max_length)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    import datasets  # only where a node reads its own file

    targets = kind.targets(datasets.Dataset.from_dict({"text": texts, **columns}), ids, mask)
    if kind.unlabelled:
        _refuse_unpredictable(file, lines, targets, task.cfg.model.max_length)
    return Split(ids, mask, targets).tensors()


# (line numbers, texts, the columns the kind's `targets` reads beside "text")
OwnRows = tuple[list[int], list[str], dict[str, list[int]]]


def _labelled(file: Path, task: Task) -> OwnRows:
    texts, labels = read_texts(file, task.label_names)
    if labels is None:
        raise PredictInputError(f"{file}: every line needs a \"label\" (one of "
                                f"{list(task.label_names)} or its id) to train on")
    return [], texts, {"label": labels}


def _texts_only(file: Path, task: Task) -> OwnRows:
    """A language model's lines: a text each, never a label; a blank text is refused (it
    would count as an example the server charges for while training nothing)."""
    rows = read_rows(file)
    for line, text, label in rows:
        if label is not None:
            raise PredictInputError(
                f'{file}:{line}: a "label" ({label!r:.40}) in a task.kind=\'causal_lm\' node\'s '
                'file: its lines are {"text": ...} only (each text is its own target); '
                "remove the labels, and the rows that are not the user's own writing")
        if not text.strip():
            raise PredictInputError(f'{file}:{line}: an empty "text": a causal-LM row needs '
                                    "text to predict; remove the line")
    return [line for line, _, _ in rows], [text for _, text, _ in rows], {}


def _refuse_unpredictable(file: Path, lines: list[int], targets: np.ndarray,
                          max_length: int) -> None:
    """A row with no next token to predict (one token within model.max_length) trains
    nothing yet counts in the example count the server charges by: refused by its line."""
    predicted = (np.asarray(targets)[:, 1:] != IGNORE).any(axis=1)
    if not predicted.all():
        bad = np.flatnonzero(~predicted)
        raise PredictInputError(
            f"{file}:{lines[int(bad[0])]}: the text is one token within model.max_length="
            f"{max_length}, leaving no next token to predict ({bad.size} such line"
            f"{'s' if bad.size > 1 else ''}); remove it or join it to another")
