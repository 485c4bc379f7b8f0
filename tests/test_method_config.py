"""Per-method `[tuning.<method>]` tables: only the active method's table shapes a run, so a
prompt run's checkpoint and export survive an edit of `[tuning.lora]`; old flat keys name
their new home; the config module imports nothing above the library."""

import ast
import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

from fedtune.config import MOVED_TUNING_KEYS, ConfigError, load_config, registry
from fedtune.config.registry import method_spec
from fedtune.models import load_backbone
from fedtune.run.checkpoint import (
    ServerState,
    load_checkpoint,
    privacy_fingerprint,
    save_checkpoint,
)
from fedtune.run.export import load_tuned, save_tuned_state
from fedtune.task.task import model_spec
from fedtune.tuning import available_methods, build_tuned_model

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("ham", "spam")
SMALL = ["model.max_length=16", "tuning.prompt.length=2"]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("minilm")


def _spec_hash(backbone, sets):
    cfg = load_config(None, sets)
    model = build_tuned_model(backbone, cfg.tuning, len(LABELS), seed=cfg.seed)
    return model_spec(model, backbone, cfg, len(LABELS)).hash


def test_another_methods_table_changes_neither_spec_hash_nor_privacy_fingerprint(backbone):
    base = _spec_hash(backbone, SMALL)
    for edit in ("tuning.lora.r=4", "tuning.lora.targets=['query']", "tuning.slash.size=8",
                 "tuning.bitfit.lr_scale=0.5"):
        assert _spec_hash(backbone, [*SMALL, edit]) == base, edit
        assert (privacy_fingerprint(load_config(None, [*SMALL, edit]))
                == privacy_fingerprint(load_config(None, SMALL)))
    # The active method's own table and the shared fields still bind the spec.
    assert _spec_hash(backbone, [*SMALL, "tuning.prompt.lr_scale=0.1"]) != base
    assert _spec_hash(backbone, [*SMALL, "tuning.domain_head=true"]) != base


def test_the_active_methods_table_is_in_its_spec(backbone):
    lora = ["tuning.method=lora", "model.max_length=16"]
    assert (_spec_hash(backbone, [*lora, "tuning.lora.lr_scale=0.5"])
            != _spec_hash(backbone, lora))


def _with_lora_r(folder: Path, r: int) -> None:
    """Edit the run folder's config.toml as a user would: add `[tuning.lora] r`."""
    raw = tomllib.loads((folder / "config.toml").read_text())
    raw["tuning"].setdefault("lora", {})["r"] = r
    (folder / "config.toml").write_text(tomli_w.dumps(raw))


def test_a_prompt_checkpoint_resumes_after_tuning_lora_r_changes(tmp_path, backbone):
    cfg = load_config(None, SMALL)
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    state = ServerState(round=1, vector=np.zeros(3, np.float32),
                        spec_hash=_spec_hash(backbone, SMALL), initial={}, client_eps={},
                        client_dp={}, record={"round": 1}, elapsed_s=1.0)
    state.privacy = privacy_fingerprint(cfg)
    save_checkpoint(tmp_path, state)
    _with_lora_r(tmp_path, 4)
    # What `fedtune run --resume` does: rebuild the spec and fingerprint from config.toml.
    edited = load_config(tmp_path / "config.toml")
    assert edited.tuning.methods["lora"].r == 4
    model = build_tuned_model(backbone, edited.tuning, len(LABELS), seed=edited.seed)
    spec = model_spec(model, backbone, edited, len(LABELS))
    assert load_checkpoint(tmp_path, spec.hash, privacy_fingerprint(edited)).round == 1


def test_a_prompt_export_loads_and_predicts_after_tuning_lora_r_changes(tmp_path, backbone):
    cfg = load_config(None, SMALL)
    model = build_tuned_model(backbone, cfg.tuning, len(LABELS), seed=cfg.seed)
    spec = model_spec(model, backbone, cfg, len(LABELS))
    gen = torch.Generator().manual_seed(1)
    state = {k: v.detach() + 0.05 * torch.randn(v.shape, generator=gen)
             for k, v in model.trainable_state().items()}
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    save_tuned_state(tmp_path, model, spec, state, LABELS)
    texts = ["Win a FREE cruise now!!!", "Re: the build script"]
    before = load_tuned(tmp_path).predict_proba(texts)
    _with_lora_r(tmp_path, 4)
    after = load_tuned(tmp_path).predict_proba(texts)
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("old", sorted(MOVED_TUNING_KEYS))
def test_every_old_flat_key_names_its_new_key(old, tmp_path):
    table, name = MOVED_TUNING_KEYS[old]
    needle = f"tuning.{old} moved: use [tuning.{table}] {name}"
    with pytest.raises(ConfigError) as info:  # as a --set override
        load_config(None, [f"tuning.{old}=1"])
    assert needle in str(info.value) and "\n" not in str(info.value)
    path = tmp_path / "old.toml"  # in a file
    path.write_text(f"[tuning]\n{old} = 1\n")
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_an_old_flat_key_in_a_sweep_grid_names_its_new_key(tmp_path):
    from fedtune.study.sweep import load_sweep

    (tmp_path / "sweep.toml").write_text(
        f'name = "s"\nbase = "{ROOT / "experiments" / "quickstart.toml"}"\n'
        '[[run]]\nname = "r"\ngrid = {"tuning.lora_r" = [4, 8]}\n')
    with pytest.raises(ConfigError, match=r"tuning.lora_r moved: use \[tuning.lora\] r"):
        load_sweep(tmp_path / "sweep.toml")


def test_a_stale_attribute_write_fails_instead_of_being_ignored():
    cfg = load_config(None)
    with pytest.raises(AttributeError, match="use tuning.lora.r"):
        cfg.tuning.lora_r = 4


def test_non_active_tables_are_validated_but_only_the_active_one_is_required():
    with pytest.raises(ConfigError, match="tuning.lora.r must be > 0"):
        load_config(None, ["tuning.lora.r=0"])  # prompt run; the lora table is still checked
    with pytest.raises(ConfigError, match="unknown key tuning.slash.sise in tuning.slash"):
        load_config(None, ["tuning.slash.sise=8"])
    with pytest.raises(ConfigError, match="unknown key tuning.adapter in tuning"):
        load_config(None, ["tuning.adapter.r=8"])
    cfg = load_config(None, ["tuning.method=slash"])
    assert cfg.to_dict()["tuning"]["slash"]["size"] == 1024  # defaults written out
    assert "lora" not in cfg.to_dict()["tuning"]  # absent tables stay absent


def test_each_method_declares_split_support_and_plugins(monkeypatch):
    assert set(available_methods()) == {"prompt", "lora", "slash", "bitfit", "head"}
    assert [m for m in available_methods() if method_spec(m).split] == ["prompt"]
    for method in ("lora", "slash", "bitfit", "head"):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"tuning.method={method}", "split.enabled=true"])
        assert "split.enabled=true needs tuning.method in: prompt" in str(info.value)
        assert "\n" not in str(info.value)
    assert all(method_spec(m).plugins == ("el2n_pruning", "population_expansion")
               for m in available_methods())  # what the code supports today
    # A method that declares no plugins is refused with any of them, by name.
    spec = method_spec("lora")
    monkeypatch.setitem(registry._METHODS, "lora", dataclasses.replace(spec, plugins=()))
    with pytest.raises(ConfigError) as info:
        load_config(None, ["tuning.method=lora", "privacy.sample.enabled=false",
                           "plugins=[{name = 'el2n_pruning', keep = 0.5}]"])
    assert str(info.value) == ("plugins[0].name='el2n_pruning' does not compose with "
                               "tuning.method='lora'; it composes with: none")


def test_importing_the_config_imports_nothing_above_the_library_and_no_cycle():
    code = (
        "import sys\n"
        "import fedtune.config\n"
        "import fedtune.config.registry\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fedtune', 'strategies', 'clients', 'torch'))\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    # Only the config, the name registry and the built-in methods' specs (registered as the
    # package loads, issue 28): no app layer (strategies, clients), no tuning code (which
    # imports fedtune.config back), no torch.
    assert json.loads(out.stdout.replace("'", '"')) == [
        "fedtune", "fedtune.config", "fedtune.config.checks", "fedtune.config.errors",
        "fedtune.config.load", "fedtune.config.methods", "fedtune.config.pruning",
        "fedtune.config.registry",
        "fedtune.config.runtime", "fedtune.config.schema",
        "fedtune.config.sigma",  # the accountants' noise ranges (a plain table)
        "fedtune.config.task",  # the task kinds' config rules (no torch either)
        "fedtune.config.user_unit"]  # who epsilon_user protects (no torch either)
    # The registry imports nothing of fedtune at load time but the error classes at the
    # bottom, so config -> registry closes no cycle.
    source = (ROOT / "fedtune" / "config" / "registry.py").read_text()
    own = [line for line in source.splitlines()
           if line.startswith(("from fedtune", "import fedtune"))]
    assert own == ["from fedtune.config.errors import ConfigError"]
    # What validation loads on demand (the registered library modules) imports no app layer
    # either, at any depth: checked on the source, as a subprocess that imports torch would
    # take seconds.
    for path in sorted((ROOT / "fedtune" / "config").glob("*.py")) + sorted(
            (ROOT / "fedtune" / "tuning").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("strategies", "clients") for n in names), path
