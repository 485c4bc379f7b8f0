"""`fedtune run` starts Ray only after its config is loaded and validated, so nothing on that
path may import torch or transformers (over a second of CPU): the method settings and their
specs are registered without them (fedtune.config.methods), and the builders, registered by
fedtune.tuning, match them. Each check runs in a fresh interpreter: this one has torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")
EXPERIMENTS = sorted(str(p) for p in (ROOT / "experiments").glob("*.toml"))


def _python(code: str, tmp_path: Path) -> dict:
    """Run `code` in a fresh interpreter; it writes its findings as JSON to `$OUT`."""
    found = tmp_path / "found.json"
    # TMPDIR: the run's temp folder lands in tmp_path, as the stubbed run never removes it.
    env = {"PYTHONPATH": str(ROOT), "PATH": "", "HF_HUB_OFFLINE": "1",
           "TMPDIR": str(tmp_path), "OUT": str(found)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(found.read_text())


def test_every_experiment_and_sweep_loads_and_validates_without_torch(tmp_path):
    out = _python(f"""
        import json, os, sys
        import strategies.plugins  # the app's plugin checks, as `fedtune run` validates
        from fedtune.config import ConfigError, load_config
        from fedtune.study.sweep import load_sweep

        loaded = {{}}
        for path in {EXPERIMENTS!r}:
            try:
                loaded[path] = load_config(path).tuning.method
            except ConfigError:  # a sweep file: each variant is loaded and validated
                loaded[path] = len(load_sweep(path).variants)
        with open(os.environ["OUT"], "w") as f:
            json.dump({{"loaded": loaded,
                       "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}, f)
    """, tmp_path)
    assert out["heavy"] == []
    assert set(out["loaded"]) == set(EXPERIMENTS)
    assert out["loaded"][str(ROOT / "experiments" / "quickstart.toml")] == "prompt"


def test_fedtune_run_reaches_start_ray_without_torch(tmp_path):
    # The driver's task build (the thread that imports torch while Ray starts) and Ray itself
    # are stubbed: what is left is everything the main thread runs before `start_ray`.
    out = _python(f"""
        import json, os, sys
        import fedtune.sim.driver as sim

        class NoBuild:
            def __init__(self, fn): pass
            def wait(self): pass

        def stop(cfg):
            with open(os.environ["OUT"], "w") as f:
                json.dump({{"heavy": [m for m in {HEAVY!r} if m in sys.modules],
                           "method": cfg.tuning.method}}, f)
            os._exit(0)

        sim._Background = NoBuild
        sim.start_ray = stop
        from fedtune.cli import app
        app(["run", "experiments/quickstart.toml", "--out", {str(tmp_path / "run")!r}])
    """, tmp_path)
    assert out == {"heavy": [], "method": "prompt"}


def test_builtin_method_specs_are_the_same_before_and_after_the_builders_load(tmp_path):
    out = _python("""
        import dataclasses, json, os, sys
        from fedtune.config.registry import method_names, method_spec

        def specs():
            out = {}
            for name in method_names():
                spec = method_spec(name)
                settings = spec.config()
                own = getattr(settings, "fingerprint", None)  # as TuningConfig.fingerprint
                out[name] = {"config": spec.config.__qualname__, "split": spec.split,
                             "plugins": list(spec.plugins),
                             "defaults": dataclasses.asdict(settings),
                             "fingerprint": own() if own else dataclasses.asdict(settings),
                             "frozen_prefix": getattr(settings, "frozen_prefix", bool)()}
            return out

        before = specs()
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        from fedtune.tuning import available_methods  # the builders, and torch
        from fedtune.tuning.bitfit import BitFitConfig
        from fedtune.tuning.head import HeadConfig
        from fedtune.tuning.lora import LoRAConfig
        from fedtune.tuning.prefix import FromLayerSettings
        from fedtune.tuning.prompt import PromptConfig
        from fedtune.tuning.slash import SlashConfig

        # The classes the method modules name are the registered ones, not copies.
        same = {"bitfit": BitFitConfig, "head": HeadConfig, "lora": LoRAConfig,
                "prompt": PromptConfig, "slash": SlashConfig}
        found = {"before": before, "after": specs(), "heavy": heavy,
                 "builders": available_methods(),
                 "identical": all(method_spec(n).config is c for n, c in same.items()),
                 "from_layer": sorted(n for n, c in same.items()
                                      if issubclass(c, FromLayerSettings))}
        with open(os.environ["OUT"], "w") as f:
            json.dump(found, f)
    """, tmp_path)
    assert out["heavy"] == []
    assert out["before"] == out["after"]
    assert out["builders"] == sorted(out["before"])
    assert out["identical"] and out["from_layer"] == ["bitfit", "lora"]
    specs = out["before"]
    assert {n: s["split"] for n, s in specs.items()} == {
        "bitfit": False, "head": False, "lora": False, "prompt": True, "slash": False}
    assert all(s["plugins"] == ["el2n_pruning", "population_expansion"]
               for s in specs.values())
    # The default tables' fingerprints enter every run's spec hash: pinned.
    assert {n: s["fingerprint"] for n, s in specs.items()} == {
        "bitfit": {"lr_scale": 0.02}, "head": {},
        "lora": {"alpha": 16, "lr_scale": 0.02, "r": 8, "targets": []},
        "prompt": {"length": 20, "lr_scale": 0.05},
        "slash": {"size": 1024, "seed": 0, "position": "output", "lr_scale": 0.1}}


def test_a_method_registered_elsewhere_brings_its_spec_and_builder_in_one_call(tmp_path):
    out = _python("""
        import json, os
        from dataclasses import dataclass
        from fedtune.config import ConfigError, load_config
        from fedtune.tuning import build_tuned_model, register_method
        from fedtune.tuning.registry import register_builder

        @dataclass
        class ProbeConfig:
            width: int = 3

            def validate(self, prefix):
                if self.width < 1:
                    raise ConfigError(f"{prefix}.width must be >= 1")

        @register_method("probe", ProbeConfig, split=True, plugins=())
        def build_probe(backbone, cfg, num_labels, seed):
            return ("probe", cfg.settings("probe").width, num_labels, seed)

        cfg = load_config(None, ["tuning.method=probe", "tuning.probe.width=5",
                                 "split.enabled=true"])
        errors = []
        for sets in (["tuning.method=probe", "tuning.probe.width=0"],
                     ["tuning.method=lora", "split.enabled=true"]):
            try:
                load_config(None, sets)
            except ConfigError as exc:
                errors.append(str(exc))
        try:
            register_builder("unregistered")(build_probe)
        except ValueError as exc:
            errors.append(str(exc))
        found = {"built": build_tuned_model(None, cfg.tuning, 2, 7),
                 "fingerprint": cfg.tuning.fingerprint()["probe"], "errors": errors}
        with open(os.environ["OUT"], "w") as f:
            json.dump(found, f)
    """, tmp_path)
    assert out["built"] == ["probe", 5, 2, 7]
    assert out["fingerprint"] == {"width": 5}
    assert out["errors"][0] == "tuning.probe.width must be >= 1"
    assert "split.enabled=true needs tuning.method in: probe, prompt" in out["errors"][1]
    assert "'unregistered' has no registered spec" in out["errors"][2]
