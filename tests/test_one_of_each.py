"""Issue 28's "one of each", read from the code itself: every file write goes through
`fedtune.run.atomic`, every run-file name is spelled once (`fedtune.run.folder`), the one
vector-into-model copy is `TunedModel.load_trainable`, and no production module uses
`unittest.mock`. Plus the atomic writer's own guarantees and the flwr-datasets shim."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

from fedtune.run import atomic, folder

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for top in ("fedtune", "clients", "strategies")
                 for p in (ROOT / top).rglob("*.py"))
# Writers that put bytes at a name without the atomic writer (called outside a lambda
# handed to it). `open` counts only with a write or append mode.
WRITERS = {"write_text", "write_bytes", "save", "savefig", "dump", "save_file",
           "save_pretrained", "rename"}
# Files that write outside run folders on purpose, with the reason.
OTHER_WRITERS = {
    "fedtune/run/atomic.py": "the writer itself",
    "fedtune/run/folder.py": "the claim's lock file (pwrite on the locked descriptor)",
    "fedtune/deploy/certs.py": "key files, created O_EXCL with mode 0600 (not a run file)",
    "fedtune/deploy/local.py": "a local deployment's logs, roster and Flower home",
    "fedtune/data/build_spamassassin.py": "the corpus build tool's output",
    "fedtune/task/cache.py": "a task-cache entry's folder renamed into place",
    "fedtune/study/sweep.py": "an unstarted variant's folder moved aside (a rename)",
    "fedtune/tuning/prefix_cache.py": "a cache array filled by name (np memmap), renamed",
    "fedtune/models/gguf.py": "a GGUF cache entry's fresh folder (the tokenizer's library "
                              "writes by name), renamed into place",
    "fedtune/run/tuned_lm.py": "a prompt adapter's files, into the fresh temp folder "
                               "write_folder_atomic hands it (peft writes by name)",
}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _calls_outside_lambdas(tree: ast.AST):
    def walk(node: ast.AST, in_lambda: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_lambda or isinstance(child, ast.Lambda)
            if isinstance(child, ast.Call) and not inner:
                yield child
            yield from walk(child, inner)
    yield from walk(tree, False)


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _writes_by_mode(call: ast.Call) -> bool:
    modes = [a for a in call.args[1:2]] + [k.value for k in call.keywords if k.arg == "mode"]
    return any(isinstance(m, ast.Constant) and isinstance(m.value, str)
               and set(m.value) & set("wax") for m in modes)


def test_every_file_write_goes_through_the_atomic_writer():
    found = []
    for path in SOURCES:
        if _rel(path) in OTHER_WRITERS:
            continue
        for call in _calls_outside_lambdas(ast.parse(path.read_text())):
            name = _call_name(call)
            os_replace = name == "replace" and isinstance(call.func, ast.Attribute) and (
                getattr(call.func.value, "id", "") == "os")  # not str/dataclasses.replace
            if name in ("open", "fdopen") and _writes_by_mode(call) or name in WRITERS or (
                    os_replace):
                found.append(f"{_rel(path)}:{call.lineno} {name}")
    # json.dumps / np.save into a stream handed to the writer are inside lambdas; a
    # `.save(` of something else (a model) would be listed here too, on purpose.
    assert not found, "writes outside fedtune.run.atomic:\n" + "\n".join(found)


# Run-file names spelled elsewhere on purpose: Flower's own config.toml.
NAMES_ELSEWHERE = {
    ("fedtune/deploy/local.py", "config.toml"): "Flower's home config, not a run file",
}


def test_every_run_file_name_is_spelled_once():
    names = {value for key, value in vars(folder).items()
             if key.isupper() and isinstance(value, str) and "." in value}
    assert {"rounds.jsonl", "summary.json", "config.toml", "checkpoint.safetensors",
            "privacy_pending.json", "curator_log.jsonl", "final_state.safetensors"} <= names
    found = []
    for path in SOURCES:
        if path == ROOT / "fedtune/run/folder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and (
                    (_rel(path), node.value) not in NAMES_ELSEWHERE):
                found.append(f"{_rel(path)}:{node.lineno} {node.value!r}")
    assert not found, "run-file names outside fedtune.run.folder:\n" + "\n".join(found)


def test_one_vector_into_model_copy():
    found = []
    for path in SOURCES:
        if path == ROOT / "fedtune/tuning/base.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and _call_name(node) == "copy_"
                    and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Call)
                    and _call_name(node.func.value) == "get_parameter"):
                found.append(f"{_rel(path)}:{node.lineno}")
    assert not found, ("copies into a model's tensors outside TunedModel.load_trainable:\n"
                       + "\n".join(found))


def test_no_unittest_mock_in_production_code():
    found = [f"{_rel(p)}:{n.lineno}" for p in SOURCES for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Import | ast.ImportFrom) and any(
                 (getattr(n, "module", None) or a.name).startswith("unittest") for a in n.names)]
    assert not found, f"unittest imported outside tests: {found}"


def test_load_trainable_copies_a_vector_into_the_trainable_tensors():
    import torch

    from fedtune.tuning.base import TunedModel

    class Tiny(TunedModel):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
            self.head = torch.nn.Linear(2, 3)

    model = Tiny()
    before = model.frozen.weight.clone()
    new = {n: torch.full_like(p, float(i + 1)) for i, (n, p) in
           enumerate(model.trainable_state().items())}
    model.load_trainable(new)
    for name, value in new.items():
        assert torch.equal(model.get_parameter(name), value)
        assert model.get_parameter(name).requires_grad  # still trainable, in place
    assert torch.equal(model.frozen.weight, before)


# --- the atomic writer ---------------------------------------------------------------

def test_stream_write_is_fsynced_renamed_and_replaces_a_planted_link(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    target = tmp_path / "rows.npy"
    os.symlink(outside, target)
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src, dst):
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic.write_stream_atomic(target, lambda fh: np.save(fh, np.arange(3)))
    assert calls == ["fsync-file", "replace", "fsync-dir"]
    assert not target.is_symlink() and outside.read_bytes() == b"precious"
    assert np.load(target).tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "rows.npy"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic.write_stream_atomic(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [
        "summary.json"]


def test_append_line_is_fsynced_and_never_follows_a_link(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic.append_line(tmp_path / "log.jsonl", '{"a": 1}', mode=0o600)
    atomic.append_line(tmp_path / "log.jsonl", '{"a": 2}', mode=0o600)
    assert (tmp_path / "log.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'
    assert len(synced) == 2 and (tmp_path / "log.jsonl").stat().st_mode & 0o777 == 0o600
    outside = tmp_path / "outside"
    outside.write_text("keep")
    os.symlink(outside, tmp_path / "planted.jsonl")
    with pytest.raises(OSError):
        atomic.append_line(tmp_path / "planted.jsonl", "x")
    assert outside.read_text() == "keep"


# --- flwr-datasets without its progress bar, through fedtune/compat ------------------

def test_natural_partitioning_draws_no_bar_on_the_tested_version(capfd):
    import datasets

    from fedtune.compat.flwr_datasets import flwr_datasets_version, is_tested
    from fedtune.data.partition import partition

    if not is_tested(flwr_datasets_version()):
        pytest.skip("flwr-datasets outside the versions the shim was checked on")
    ds = datasets.Dataset.from_dict({"label": [0, 1] * 30,
                                     "mailing_list": ["a"] * 20 + ["b"] * 20 + ["c"] * 20})
    parts = partition(ds, "natural", 3, seed=0, min_partition_size=1)
    assert [p.tolist() for p in parts] == [list(range(0, 20)), list(range(20, 40)),
                                           list(range(40, 60))]
    assert "Generating partition_id_to_indices" not in capfd.readouterr().err


def test_the_shim_restores_the_name_and_falls_back_outside_the_tested_versions():
    from flwr_datasets.partitioner import natural_id_partitioner as module

    from fedtune.compat.flwr_datasets import quiet_natural_partitioner

    original = module.tqdm
    with quiet_natural_partitioner("0.6.1") as quiet:
        assert quiet and module.tqdm is not original
        assert module.tqdm.keywords == {"disable": True}
    assert module.tqdm is original
    with quiet_natural_partitioner("0.7.0") as quiet:  # unchecked: nothing is touched
        assert not quiet and module.tqdm is original
    assert module.tqdm is original
