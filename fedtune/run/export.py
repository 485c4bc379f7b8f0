"""A tuned model outside its run: the trained tensors and what rebuilds the model around them.

A run folder ends with `final_state.safetensors` (every federated tensor, by name) next to
`config.toml`; peft-based methods also leave `adapter/` (PEFT `save_pretrained`). The
model is rebuilt from the config (frozen backbone + seeded method modules, e.g. SLaSh's
projections) and the tensors are loaded into it; the spec hash in the file's metadata
proves the rebuilt layout, backbone weights and method config are the ones trained, and a
sha256 of the tensors' bytes (`content_sha256`) that their values are the ones saved, and
`prediction_sha256` binds everything else that changes a prediction: the label names, the
config's `max_length`, backbone, layer pruning (and the layers kept), the method settings
and seed, and the tokenizer's identity, next to the hashes above (`prediction_settings`).
A state whose labels were reversed, or whose config.toml got another `max_length`, is
refused by name. These hashes catch edits and damage, not a forger: anyone who can write
the file can recompute them.

`export_run` writes these into a self-contained folder with a manifest, `fedtune.json`: the
state and config as the run saved them (a symlink in their place is refused, never followed),
and a PEFT adapter written from the verified tensors (the run folder's `adapter/` is not
copied: no hash covers it). The backbone hash covers the backbone's output-changing
`config.json` values too (`fedtune.models.backbone`).
`load_tuned` opens either a run folder or an export, as the model of its task kind
(`LOADED`): a classifier (`TunedClassifier.predict_proba`) or a causal language model
(`fedtune.run.tuned_lm.TunedLM.generate`). A causal-LM state's prediction hash also binds
its task kind, and its soft prompt is exported as a PEFT prompt-tuning adapter
(`EXTRA_ADAPTERS`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes  # the file's bytes, no write

from fedtune.config import ExperimentConfig, load_config
from fedtune.data import tokenize_texts
from fedtune.data.tokenizer_probe import tokenizer_behaviour
from fedtune.models import backbone_for
from fedtune.privacy.randomness import noise_note
from fedtune.run.atomic import write_atomic, write_folder_atomic, write_json_atomic
from fedtune.run.folder import (
    ADAPTER_DIR,
    CONFIG_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    RunFolderError,
    claim_run_folder,
)
from fedtune.run.tuned_lm import TunedLM, write_prompt_adapter
from fedtune.runtime.torch_setup import configure_torch
from fedtune.tuning import TunedModel, build_tuned_model
from fedtune.wire.delta import DeltaSpec

FORMAT = "fedtune-tuned-state/1"


class ExportError(ValueError):
    """A run folder or export cannot be loaded as the model it claims to be."""


def save_tuned_state(folder: Path, model: TunedModel, spec: DeltaSpec,
                     state: dict[str, torch.Tensor], label_names: tuple[str, ...],
                     cfg: ExperimentConfig | None = None) -> None:
    """Write `state` (the tensors of `spec`) into `folder`, and load it into `model` so a
    peft-based model can also leave its standard adapter. The prediction settings are
    bound from `cfg`, by default the run's `folder/config.toml` (without either the state
    is saved unbound, and `load_tuned` refuses it)."""
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "spec_hash": spec.hash, "backbone_hash": spec.backbone_hash,
            "content_sha256": content_hash(tensors),
            "method": model.method, "label_names": json.dumps(list(label_names))}
    if cfg is None and (folder / CONFIG_FILE).is_file():
        cfg = load_config(folder / CONFIG_FILE)
    if cfg is not None:
        settings = prediction_settings(cfg, meta, kind_backbone(cfg))
        meta[SETTINGS_KEY] = json.dumps(settings, sort_keys=True)
        meta[BINDING_KEY] = _settings_hash(settings)
    # Through the one atomic writer: a link planted under the name is replaced, not followed;
    # as the bytes save_file would write, so no library is handed a swappable temp name.
    write_atomic(folder / STATE_FILE, safetensors_bytes(tensors, metadata=meta))
    # A PeftModel exists only once peft is imported; peft is not imported otherwise (it
    # costs ~2 s of CPU at start-up).
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model.backbone, peft.PeftModel):
        model.load_trainable(tensors)
        # peft writes by name: into a fresh folder (nothing planted there), moved into place.
        write_folder_atomic(folder / ADAPTER_DIR,
                            lambda tmp: model.backbone.save_pretrained(str(tmp)))


BINDING_KEY = "prediction_sha256"
SETTINGS_KEY = "prediction_settings"
DEFAULT_KIND = "classification"


def kind_backbone(cfg: ExperimentConfig) -> Any:
    """The frozen backbone of `cfg`'s task kind (a language model keeps its LM head), its
    tokenizer made ready for that kind as the run's task had it (a decoder without a pad
    token pads with eos): the tokenizer bound at save is the one checked at load."""
    from fedtune.task.kinds import task_kind

    kind = task_kind(cfg.task.kind)
    backbone = backbone_for(cfg.model, kind=kind.model_kind)
    kind.prepare_tokenizer(backbone.tokenizer)
    return backbone


def prediction_settings(cfg: ExperimentConfig, meta: dict[str, str], backbone: Any
                        ) -> dict[str, Any]:
    """Every value besides the tensors that changes what the loaded model predicts (or
    generates): for a task kind other than classification, the kind too (a classifier's
    binding stays what older fedtune saved, so its exports still load)."""
    kind = {} if cfg.task.kind == DEFAULT_KIND else {"task_kind": cfg.task.kind}
    return {
        **kind,
        "label_names": json.loads(meta["label_names"]),
        "max_length": cfg.model.max_length,
        "backbone": cfg.model.backbone,
        "prune_layers": cfg.model.prune_layers,
        "layers_kept": list(backbone.layers_kept),
        "tuning": cfg.tuning.fingerprint(),
        "seed": cfg.seed,
        "tokenizer_sha256": tokenizer_hash(backbone.tokenizer),
        **{key: meta[key] for key in ("spec_hash", "backbone_hash", "content_sha256",
                                      "method")},
    }


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of a tokenizer's identity: its class, its full serialized pipeline (a fast
    tokenizer's vocabulary, normalizer and post-processor) or else its vocabulary, special
    tokens and padding/truncation sides, and what it does (`tokenizer_behaviour`: the ids of
    fixed probe texts and the text of fixed ids), so a `tokenizer_config.json` switch
    applied outside the pipeline (`split_special_tokens`, `clean_up_tokenization_spaces`, or
    the next one) moves it."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    # First: the probes set the per-call padding/truncation state that is dropped below.
    digest.update(tokenizer_behaviour(tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        # Each call sets these on the shared tokenizer (fedtune pads and truncates to
        # `max_length`, bound separately): state of the last call, not identity.
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
        digest.update(json.dumps(pipeline, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([str(tokenizer.special_tokens_map),
                              getattr(tokenizer, "padding_side", None),
                              getattr(tokenizer, "truncation_side", None)]).encode())
    return digest.hexdigest()


def _check_binding(path: Path, meta: dict[str, str], settings: dict[str, Any]) -> None:
    expected = meta.get(BINDING_KEY)
    if not expected:
        raise ExportError(f"{path} has no prediction hash (labels, max_length, tokenizer, "
                          "method settings): saved by an older fedtune or rewritten outside "
                          "it; its predictions cannot be verified")
    if _settings_hash(settings) == expected:
        return
    try:
        saved = json.loads(meta.get(SETTINGS_KEY, "{}"))
    except json.JSONDecodeError:
        saved = {}
    if _settings_hash(saved) != expected:
        changed = "the state's metadata"
    else:
        keys = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
        changed = ", ".join(keys)
    raise ExportError(f"{path}: {changed[:200]} changed since the run saved this state (the "
                      "prediction hash does not match): the labels, config.toml or tokenizer "
                      "were edited or replaced (or, for tokenizer_sha256, the state was saved "
                      "before the hash covered how the tokenizer encodes and decodes); "
                      "refusing a model that would predict otherwise")


def _check_kind(path: Path, meta: dict[str, str], cfg: ExperimentConfig) -> None:
    """A task kind edited in config.toml, named before a backbone of the other kind loads
    (the prediction hash refuses it anyway; this only says what changed). Read from the
    saved settings only where they match the prediction hash."""
    try:
        saved = json.loads(meta.get(SETTINGS_KEY, "{}"))
    except json.JSONDecodeError:
        return
    if not isinstance(saved, dict) or _settings_hash(saved) != meta.get(BINDING_KEY):
        return
    kind = saved.get("task_kind", DEFAULT_KIND)
    if kind != cfg.task.kind:
        raise ExportError(f"{path}: task_kind changed since the run saved this state (a "
                          f"{kind!r} model, config.toml says task.kind={cfg.task.kind!r}); "
                          "refusing a model that would predict otherwise")


def content_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_values(path: Path, meta: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    expected = meta.get("content_sha256")
    if not expected:
        raise ExportError(f"{path} has no content hash of its tensor values (saved by an older "
                          "fedtune, or rewritten outside it): its values cannot be verified")
    if content_hash(state) != expected:
        raise ExportError(f"{path}: the tensor values do not match the content hash saved with "
                          "them: the file was changed after the run wrote it")
    # A diverged run saves NaN honestly; a model made of it predicts nothing meaningful.
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in sorted(state.items())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if bad:
        listed = ", ".join(f"{name} ({n})" for name, n in bad.items())
        raise ExportError(f"{path} holds non-finite values (NaN or inf) in {listed}: the run "
                          "diverged; this state is not a usable model")


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
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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


# Task kind -> what a loaded model is used through: classes for a classifier, generations
# for a language model (`fedtune predict` asks the kind's).
LOADED: dict[str, type[TunedClassifier] | type[TunedLM]] = {
    DEFAULT_KIND: TunedClassifier, "causal_lm": TunedLM}


def load_tuned(folder: str | Path) -> TunedClassifier | TunedLM:
    """Rebuild the tuned model of a run folder or an export; raises `ExportError` naming
    what is missing or does not match."""
    from fedtune.task.task import model_spec

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
    _check_values(folder / STATE_FILE, meta, state)
    label_names = tuple(json.loads(meta["label_names"]))
    _check_kind(folder / STATE_FILE, meta, cfg)
    backbone = kind_backbone(cfg)
    if backbone.hash != meta["backbone_hash"]:
        raise ExportError(
            f"model.backbone={cfg.model.backbone!r} here hashes {backbone.hash}, but "
            f"{folder.name} was tuned on {meta['backbone_hash']}: not the same backbone (its "
            "weights or a config.json value such as rms_norm_eps differ; a state saved "
            "before backbone hashes covered config.json is refused too): load it with the "
            "backbone it was tuned on, or tune again")
    model = build_tuned_model(backbone, cfg.tuning, len(label_names), seed=cfg.seed,
                              kind=cfg.task.kind)
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
    _check_binding(folder / STATE_FILE, meta, prediction_settings(cfg, meta, backbone))
    model.load_trainable(state)
    if cfg.task.kind not in LOADED:
        raise ExportError(f"{folder}: a task.kind={cfg.task.kind!r} model cannot be loaded "
                          f"for prediction yet (built: {', '.join(sorted(LOADED))})")
    return LOADED[cfg.task.kind](model, cfg, label_names, spec, backbone.tokenizer)


def _state_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata() or {}


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """Copy a run's tuned state into `out` with a manifest; returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if out.is_symlink():
        raise ExportError(f"OUT {out} is a symlink; give the real folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder; choose a new output folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose another output folder")
    for name in EXPORTED_FILES:  # named before anything is loaded or written
        _refuse_link(run_dir / name)
    tuned = load_tuned(run_dir)  # validates before anything is written
    try:  # claimed as `fedtune run --out` is: locked, no link in it, then checked empty again
        folder = claim_run_folder(out, flag="OUT")
    except RunFolderError as exc:
        raise ExportError(str(exc)) from None
    with folder:
        if any(p.name != LOCK_FILE for p in out.iterdir()):
            raise ExportError(f"{out} exists and is not empty; choose another output folder")
        _write_export(run_dir, out, tuned)
        (out / LOCK_FILE).unlink()  # the export holds the model only
    return out


# (task kind, method) -> the PEFT adapter an export writes for a method whose model is no
# PeftModel: a causal LM's soft prompt as prompt tuning.
EXTRA_ADAPTERS: dict[tuple[str, str], Callable[[Any, Path], None]] = {
    ("causal_lm", "prompt"): write_prompt_adapter}


def _adapter_writer(tuned: TunedClassifier | TunedLM) -> Callable[[Path], None] | None:
    """What writes the export's `adapter/` from the loaded model, whose tensors are the
    verified ones (never the run folder's `adapter/`, which no hash covers and which may
    hold links): a PeftModel's own `save_pretrained`, or the kind's extra adapter."""
    peft = sys.modules.get("peft")  # imported by building a peft-based model, else unused
    backbone = tuned.model.backbone
    if peft is not None and isinstance(backbone, peft.PeftModel):
        return lambda tmp: backbone.save_pretrained(str(tmp))
    extra = EXTRA_ADAPTERS.get((tuned.cfg.task.kind, tuned.cfg.tuning.method))
    return None if extra is None else (lambda tmp: extra(tuned, tmp))


# The run folder's files an export carries (as bytes) or reads into its manifest.
EXPORTED_FILES = (STATE_FILE, CONFIG_FILE, SUMMARY_FILE)


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise ExportError(f"{path} is a symbolic link; export copies only the run folder's "
                          "own files: put the file itself there")


def _own_file(run_dir: Path, name: str) -> bytes:
    """A run folder's file, as bytes; a link is refused, not followed (the export would
    otherwise carry whatever file it points to)."""
    _refuse_link(run_dir / name)
    return (run_dir / name).read_bytes()


def _write_export(run_dir: Path, out: Path, tuned: TunedClassifier | TunedLM) -> None:
    # Every file through the one atomic writer (a fresh temp name, renamed into place), as
    # bytes: no copier is handed the temp name.
    state_bytes = _own_file(run_dir, STATE_FILE)
    # The bytes shipped hold the tensors load_tuned verified (not a file swapped since).
    shipped = content_hash(safetensors_load(state_bytes))
    if shipped != content_hash(tuned.model.trainable_state()):
        raise ExportError(f"{run_dir / STATE_FILE} changed while it was exported; export again")
    write_atomic(out / STATE_FILE, state_bytes)
    write_atomic(out / CONFIG_FILE, _own_file(run_dir, CONFIG_FILE))
    writer = _adapter_writer(tuned)
    if writer is not None:
        write_folder_atomic(out / ADAPTER_DIR, writer)
    summary = {}
    if (run_dir / SUMMARY_FILE).is_file():
        summary = json.loads(_own_file(run_dir, SUMMARY_FILE))
    manifest = {
        "format": FORMAT,
        "task_kind": tuned.cfg.task.kind,
        "method": tuned.cfg.tuning.method,
        "backbone": tuned.cfg.model.backbone,
        "backbone_hash": tuned.spec.backbone_hash,
        "spec_hash": tuned.spec.hash,
        "prediction_sha256": _state_metadata(out / STATE_FILE).get(BINDING_KEY),
        "tensors": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in
                    zip(tuned.spec.names, tuned.spec.shapes, tuned.spec.dtypes, strict=True)],
        "label_names": list(tuned.label_names),
        "max_length": tuned.cfg.model.max_length,
        "peft_adapter": ADAPTER_DIR if (out / ADAPTER_DIR).is_dir() else None,
        "source_run": str(run_dir.resolve()),
        "test_accuracy": summary.get("final_accuracy"),
        "test_examples": summary.get("test_examples"),
        # A language model's quality (null for a classifier, and where the run had none).
        "test_perplexity": summary.get("test_perplexity"),
        **privacy_statement(tuned.cfg, summary),
    }
    write_json_atomic(out / MANIFEST_FILE, manifest)


def privacy_statement(cfg: ExperimentConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """The export's privacy fields: each epsilon (null when that DP level was off) with
    the note on what its noise is secret from, and, for a split run, what the server saw."""
    from fedtune.run.epsilon_marks import epsilon_note
    from fedtune.wire.fields import statement

    note = noise_note(cfg.privacy.reproducible_noise)
    fields: dict[str, Any] = {}
    for level in ("sample", "user"):
        value = fields[f"epsilon_{level}"] = summary.get(f"epsilon_{level}")
        # What weakens it too (seeded noise, data in clear, disclosed counts).
        fields[f"epsilon_{level}_note"] = epsilon_note(cfg, level, value)
    fields["delta"] = summary.get("delta")
    fields["privacy"] = {"reproducible_noise": cfg.privacy.reproducible_noise, "noise": note,
                         "smashed_data": _smashed_data_line(cfg),
                         # What the clients' messages carried (fedtune.wire.fields).
                         "in_clear": statement(cfg)}
    return fields


def _smashed_data_line(cfg: ExperimentConfig) -> str | None:
    if not cfg.split.enabled:
        return None
    smashed = cfg.split.smashed_dp
    if smashed.enabled:
        return ("clipped and noised on the client before upload (split.smashed_dp: "
                f"activation clip {smashed.activation_clip_norm:g}, gradient clip "
                f"{smashed.gradient_clip_norm:g}, target epsilon {smashed.target_epsilon:g})")
    return ("in clear: the server saw the cut-layer activations and uploaded gradients of "
            "every trained example; no epsilon covers the raw training data against the server")
