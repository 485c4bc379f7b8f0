"""A worker rebuilds the driver's task from a bundle: same data, partitions, validation rows
and spec, arrays memory-mapped (shared pages), and no corpus loading; and it reuses one model
per process."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fedtune.config import load_config
from fedtune.task.task import _task_from_bundle, get_task, task_key, write_bundle

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.num_clients=7", "model.max_length=32", "tuning.prompt.length=4"]


def _cfg(*extra: str):
    return load_config(ROOT / "experiments/quickstart.toml", [*SETS, *extra])


def test_bundle_rebuilds_the_same_task_memory_mapped(tmp_path):
    cfg = _cfg()
    task = get_task(cfg)
    folder = write_bundle(task, tmp_path / "bundle")
    again = _task_from_bundle(task_key(cfg), cfg.to_toml(), str(folder))
    assert again is not task
    assert again.spec.hash == task.spec.hash and again.label_names == task.label_names
    for name in ("train", "test"):
        a, b = getattr(task, name), getattr(again, name)
        for field in ("input_ids", "attention_mask", "labels"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            assert isinstance(getattr(b, field), np.memmap)
    assert len(again.partitions) == len(task.partitions) == 7
    for p, q in zip(task.partitions, again.partitions, strict=True):
        np.testing.assert_array_equal(p, q)
    for t in (task.client_data(3).tensors, again.client_data(3).tensors):
        assert t[0].dtype == torch.int64
    np.testing.assert_array_equal(task.client_data(3).tensors[0], again.client_data(3).tensors[0])
    # The server's validation rows travel too, and no actor's partition holds one.
    assert task.validation_rows.size > 0
    np.testing.assert_array_equal(again.validation_rows, task.validation_rows)
    np.testing.assert_array_equal(again.validation.labels, task.validation.labels)
    assert not np.intersect1d(np.concatenate(again.partitions), again.validation_rows).size


def test_bundle_of_another_task_or_a_missing_one_is_ignored(tmp_path):
    folder = write_bundle(get_task(_cfg()), tmp_path / "bundle")
    other = _cfg("data.num_clients=5")
    assert len(get_task(other, folder).partitions) == 5
    assert len(get_task(other, tmp_path / "nowhere").partitions) == 5


def test_worker_reads_a_bundle_without_importing_datasets(tmp_path):
    cfg = _cfg()
    folder = write_bundle(get_task(cfg), tmp_path / "bundle")
    (tmp_path / "cfg.toml").write_text(cfg.to_toml())
    code = (
        "import sys\n"
        "from fedtune.config import load_config\n"
        "from fedtune.task.task import get_task\n"
        "import clients.handlers\n"
        f"task = get_task(load_config({str(tmp_path / 'cfg.toml')!r}), {str(folder)!r})\n"
        "print(len(task.partitions), task.validation_rows.size, sorted(m for m in ('datasets',"
        " 'flwr_datasets', 'peft', 'opacus') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert out.strip().splitlines()[-1] == f"7 {get_task(cfg).validation_rows.size} []"


def test_worker_model_is_reused_and_reset_by_the_global_vector():
    from clients.handlers import worker_model

    task = get_task(_cfg())
    model = worker_model(task, torch.device("cpu"))
    assert worker_model(task, torch.device("cpu")) is model
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(1.0)
    vector = task.initial_vector()
    model.load_trainable(task.spec.unflatten(vector))
    fresh = task.new_model()
    for (n, p), (m, q) in zip(model.state_dict().items(), fresh.state_dict().items(),
                              strict=True):
        assert n == m and torch.equal(p, q)
