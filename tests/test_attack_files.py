"""Attack (THREATS.md class 7): writes under --out must never follow a planted symlink."""

from __future__ import annotations

import os
from pathlib import Path

from fedtune import sweep as sweep_mod


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious\n")
    return victim


def test_sweep_never_writes_through_planted_link(tmp_path: Path, monkeypatch) -> None:
    """A sweep's log/sweep files under its --out are never written through a planted link."""
    out = tmp_path / "sweep"
    (out / "v1").mkdir(parents=True)
    victim = _victim(tmp_path)
    os.symlink(victim, out / "v1" / sweep_mod.LOG_FILE)

    class Dead:
        returncode = 1

        def poll(self) -> int:
            return 1

    def launch(*args, stdout, **kwargs) -> Dead:
        stdout.write("the variant's output\n")  # what the real child writes to the log
        stdout.flush()
        return Dead()

    monkeypatch.setattr(sweep_mod.subprocess, "Popen", launch)
    spec = sweep_mod.Sweep(name="s", base=tmp_path / "base.toml",
                           variants=(sweep_mod.Variant(name="v1", overrides=()),))
    try:
        sweep_mod.run_sweep(spec, out, poll_s=0.0)
    except (RuntimeError, OSError):
        pass
    assert victim.read_text() == "precious\n"


def test_export_never_writes_through_a_symlinked_out_folder(tmp_path: Path, monkeypatch) -> None:
    """`fedtune export RUN OUT` refuses an OUT that is a symlink (as `fedtune run --out` does)."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from fedtune import export as export_mod
    from fedtune.config import load_config

    run = tmp_path / "run"
    run.mkdir()
    save_file({"w": torch.zeros(2)}, str(run / export_mod.STATE_FILE), metadata={})
    (run / export_mod.CONFIG_FILE).write_text("")
    cfg = load_config(None, [])
    spec = SimpleNamespace(backbone_hash="b", hash="h", names=["w"], shapes=[(2,)],
                           dtypes=["float32"])
    monkeypatch.setattr(export_mod, "load_tuned", lambda folder: SimpleNamespace(
        cfg=cfg, spec=spec, label_names=("a", "b")))
    elsewhere = tmp_path / "outside"
    elsewhere.mkdir()
    link = tmp_path / "export"
    os.symlink(elsewhere, link)
    try:
        export_mod.export_run(run, link)
    except (export_mod.ExportError, OSError):
        pass
    assert list(elsewhere.iterdir()) == []


def test_the_peft_adapter_is_never_written_through_a_link_planted_in_out(tmp_path: Path) -> None:
    """A link planted inside --out/adapter/ (a folder: the claim scans the top level only) is
    not followed when the run saves its adapter."""
    from types import SimpleNamespace

    import peft
    import torch
    from torch import nn

    from fedtune.export import ADAPTER_DIR, save_tuned_state

    out = tmp_path / "run"
    (out / ADAPTER_DIR).mkdir(parents=True)
    victim = _victim(tmp_path)
    os.symlink(victim, out / ADAPTER_DIR / "adapter_config.json")
    base = nn.Sequential(nn.Linear(4, 4))
    backbone = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"]))
    model = SimpleNamespace(method="lora", backbone=backbone,
                            get_parameter=lambda name: torch.zeros(2))
    spec = SimpleNamespace(hash="h", backbone_hash="b")
    try:
        save_tuned_state(out, model, spec, {"w": torch.zeros(2)}, ("a", "b"))
    except OSError:
        pass
    assert victim.read_text() == "precious\n"
