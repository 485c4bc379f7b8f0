"""Which examples a SuperNode trains on: its share of the experiment's corpus (node config
`partition-id`), or its own file (node config `data-path`, JSON lines with a `text` and a
`label` on every line). The partition id is the client's identity either way: its cohort
draws, seeds and DP history are keyed by it. Which node holds which partition is not the
node's say: the simulation engine writes `partition-id` into each node's config, and a
deployment's server checks each claim against its operator roster
(`strategies.discovery`). A node with its own file tells the server the file's example
count once, at discovery (`own_example_count`); the server weights it and plans its DP
charges by that count for the whole run, sends it back in every train instruction, and the
node trains only when its data still has exactly that many rows (`training_data`): a file
edited between discovery and a round is refused, not trained on at a sample rate the
server never charged."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedtune.data import tokenize_texts
from fedtune.data.predict_input import PredictInputError, read_texts
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
    # changed file or another backbone/length/label set is read again.
    key = (str(file), stat.st_mtime_ns, stat.st_size, task.backbone.hash,
           task.cfg.model.max_length, task.label_names)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _load(file, task)
    return _CACHE[key]


_CACHE: dict[tuple, TensorDataset] = {}


def _load(file: Path, task: Task) -> TensorDataset:
    path = str(file)
    if file.suffix != ".jsonl":
        raise PredictInputError(f"node config {DATA_PATH_KEY}={path!r}: expected a .jsonl "
                                'file of {"text": ..., "label": ...} lines')
    texts, labels = read_texts(file, task.label_names)
    if labels is None or not texts:
        raise PredictInputError(f"{path}: every line needs a \"label\" (one of "
                                f"{list(task.label_names)} or its id) to train on")
    tok = tokenize_texts(texts, task.backbone.tokenizer, task.cfg.model.max_length)
    return TensorDataset(torch.from_numpy(tok["input_ids"].astype(np.int64)),
                         torch.from_numpy(tok["attention_mask"].astype(np.int64)),
                         torch.tensor(labels, dtype=torch.int64))
