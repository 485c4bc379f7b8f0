"""A tuned model outside its run: the trained tensors and what rebuilds the model around them.

A run folder ends with `final_state.safetensors` (every federated tensor, by name) next to
`config.toml`; peft-based methods also leave `adapter/` (PEFT `save_pretrained`). The
model is rebuilt from the config (frozen backbone + seeded method modules, e.g. SLaSh's
projections) and the tensors are loaded into it; the spec hash in the file's metadata
proves the rebuilt layout, backbone weights and method config are the ones trained.

`export_run` copies these into a self-contained folder with a manifest, `fedtune.json`.
`load_tuned` opens either a run folder or an export.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedtune.config import ExperimentConfig, load_config
from fedtune.data import tokenize_texts
from fedtune.delta import DeltaSpec
from fedtune.ledger import CONFIG_FILE, SUMMARY_FILE
from fedtune.models import load_backbone
from fedtune.torch_setup import configure_torch
from fedtune.tuning import TunedModel, build_tuned_model

STATE_FILE = "final_state.safetensors"
ADAPTER_DIR = "adapter"
MANIFEST_FILE = "fedtune.json"
FORMAT = "fedtune-tuned-state/1"


class ExportError(ValueError):
    """A run folder or export cannot be loaded as the model it claims to be."""


def save_tuned_state(folder: Path, model: TunedModel, spec: DeltaSpec,
                     state: dict[str, torch.Tensor], label_names: tuple[str, ...]) -> None:
    """Write `state` (the tensors of `spec`) into `folder`, and load it into `model` so a
    peft-based model can also leave its standard adapter."""
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / STATE_FILE), metadata={
        "format": FORMAT, "spec_hash": spec.hash, "backbone_hash": spec.backbone_hash,
        "method": model.method, "label_names": json.dumps(list(label_names))})
    # A PeftModel exists only once peft is imported; peft is not imported otherwise (it
    # costs ~2 s of CPU at start-up).
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model.backbone, peft.PeftModel):
        with torch.no_grad():
            for name, tensor in tensors.items():
                model.get_parameter(name).copy_(tensor)
        model.backbone.save_pretrained(str(folder / ADAPTER_DIR))


@dataclass
class TunedClassifier:
    """A loaded tuned model that classifies raw texts."""

    model: TunedModel
    cfg: ExperimentConfig
    label_names: tuple[str, ...]
    spec: DeltaSpec
    tokenizer: Any

    @torch.inference_mode()
    def predict_proba(self, texts: list[str], batch_size: int | None = None,
                      on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Class probabilities, one row per text. Texts are tokenized as in training
        (truncated and padded to `model.max_length`); `on_batch(n)` follows progress."""
        if isinstance(texts, str):
            raise TypeError("predict_proba takes a list of texts, not one string")
        batch_size = batch_size or self.cfg.train.eval_batch_size
        self.model.eval()
        rows = []
        for start in range(0, len(texts), batch_size):
            tok = tokenize_texts(list(texts[start:start + batch_size]), self.tokenizer,
                                 self.cfg.model.max_length)
            logits = self.model(torch.from_numpy(tok["input_ids"].astype(np.int64)),
                                torch.from_numpy(tok["attention_mask"].astype(np.int64)))
            rows.append(torch.softmax(logits.float(), dim=-1).numpy())
            if on_batch is not None:
                on_batch(len(rows[-1]))
        return np.concatenate(rows) if rows else np.zeros((0, len(self.label_names)))


def load_tuned(folder: str | Path) -> TunedClassifier:
    """Rebuild the tuned model of a run folder or an export; raises `ExportError` naming
    what is missing or does not match."""
    from fedtune.task import model_spec

    configure_torch()
    folder = Path(folder)
    for name in (CONFIG_FILE, STATE_FILE):
        if not (folder / name).is_file():
            what = "a finished run folder or a `fedtune export` folder"
            raise ExportError(f"{folder} has no {name}: expected {what}")
    cfg = load_config(folder / CONFIG_FILE)
    try:
        with safe_open(str(folder / STATE_FILE), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
    except (OSError, SafetensorError) as exc:
        raise ExportError(f"{folder / STATE_FILE} is not a readable safetensors file: {exc}"
                          ) from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{folder / STATE_FILE} is not a {FORMAT} file "
                          f"(metadata format={meta.get('format')!r})")
    label_names = tuple(json.loads(meta["label_names"]))
    backbone = load_backbone(cfg.model.backbone)
    if backbone.hash != meta["backbone_hash"]:
        raise ExportError(
            f"model.backbone={cfg.model.backbone!r} here has weights hash {backbone.hash}, "
            f"but {folder.name} was tuned on {meta['backbone_hash']}: not the same backbone")
    model = build_tuned_model(backbone, cfg.tuning, len(label_names), seed=cfg.seed)
    spec = model_spec(model, backbone, cfg, len(label_names))
    if spec.hash != meta["spec_hash"]:
        raise ExportError(
            f"{folder / STATE_FILE} has spec hash {meta['spec_hash']}, but its config.toml "
            f"builds a {cfg.tuning.method} model with spec hash {spec.hash}: "
            "the file and the config do not belong together")
    if set(state) != set(spec.names):
        raise ExportError(f"{folder / STATE_FILE} holds tensors {sorted(state)}, the model "
                          f"has {sorted(spec.names)}")
    # safetensors stores names sorted; the spec's order is the model's.
    spec.flatten({name: state[name] for name in spec.names})  # checks every shape
    with torch.no_grad():
        for name, tensor in state.items():
            model.get_parameter(name).copy_(tensor)
    return TunedClassifier(model, cfg, label_names, spec, backbone.tokenizer)


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """Copy a run's tuned state into `out` with a manifest; returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    tuned = load_tuned(run_dir)  # validates before anything is written
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / STATE_FILE, out / STATE_FILE)
    shutil.copy2(run_dir / CONFIG_FILE, out / CONFIG_FILE)
    if (run_dir / ADAPTER_DIR).is_dir():
        shutil.copytree(run_dir / ADAPTER_DIR, out / ADAPTER_DIR)
    summary = {}
    if (run_dir / SUMMARY_FILE).is_file():
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    manifest = {
        "format": FORMAT,
        "method": tuned.cfg.tuning.method,
        "backbone": tuned.cfg.model.backbone,
        "backbone_hash": tuned.spec.backbone_hash,
        "spec_hash": tuned.spec.hash,
        "tensors": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in
                    zip(tuned.spec.names, tuned.spec.shapes, tuned.spec.dtypes, strict=True)],
        "label_names": list(tuned.label_names),
        "max_length": tuned.cfg.model.max_length,
        "peft_adapter": ADAPTER_DIR if (out / ADAPTER_DIR).is_dir() else None,
        "source_run": str(run_dir.resolve()),
        "test_accuracy": summary.get("final_accuracy"),
        "test_examples": summary.get("test_examples"),
        "epsilon_sample": summary.get("epsilon_sample"),
        "epsilon_user": summary.get("epsilon_user"),
        "delta": summary.get("delta"),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
