"""A tokenized split of a task: token ids, attention masks and targets, row for row
(`labels`: a class id per row for a classifier, the next-token targets [N, T] for a
language model). Kept apart from `fedtune.task.task` so the task kinds read it without
importing the task that uses them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class Split:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def tensors(self, indices: np.ndarray | None = None) -> TensorDataset:
        sel = slice(None) if indices is None else np.asarray(indices)
        return TensorDataset(
            torch.from_numpy(np.asarray(self.input_ids[sel], dtype=np.int64)),
            torch.from_numpy(np.asarray(self.attention_mask[sel], dtype=np.int64)),
            torch.from_numpy(np.asarray(self.labels[sel], dtype=np.int64)),
        )
