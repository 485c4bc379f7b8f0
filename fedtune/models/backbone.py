"""Load a frozen pretrained encoder and its tokenizer, once per process.

Every Ray actor serves many virtual clients; loading (and hashing) the ~90 MB backbone per
client would dominate a round, so the result is cached for the life of the process, per
(backbone, layer pruning).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedtune.config.pruning import PruneKey, prune_key
from fedtune.config.runtime import runtime_settings
from fedtune.models.backbone_source import BUNDLED, BackboneSourceError, gguf_source
from fedtune.models.families import FamilyError, derive_structure
from fedtune.models.layer_pruning import layers_to_drop, prune_model

if TYPE_CHECKING:
    # transformers' model classes are imported where a model is loaded: importing them costs
    # about 2 CPU-s, and config validation imports this module (fedtune.runtime.startup's profile).
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedtune.config import ModelConfig


class BackboneError(RuntimeError):
    """The configured backbone cannot be loaded on this machine."""


@dataclass(frozen=True)
class Backbone:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    # Identifies the frozen model (class, output-changing config values, weights); deltas
    # and saved states made against another are rejected.
    hash: str
    # Original indices of the transformer blocks the model holds (all of them unless
    # `model.prune_layers` dropped some); empty when its block list cannot be found.
    layers_kept: tuple[int, ...] = ()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_backbone_path(name: str) -> str:
    """Map a config name to something `from_pretrained` can open without a network. A GGUF
    source (a bundled GGUF such as "smollm2", a .gguf file, a folder holding one) maps to
    its dequantized float32 folder in the cache (`<cache_dir>/gguf/<key>`, made on first
    use: fedtune.models.gguf); `<cache_dir>` is `$FEDTUNE_CACHE_DIR` or ~/.cache/fedtune,
    as for the token cache. Raises BackboneSourceError when a bundled package is missing."""
    gguf_file = gguf_source(name)
    if gguf_file is not None:
        from fedtune.models.gguf import materialize

        return str(materialize(gguf_file, runtime_settings().cache_dir))
    if name in BUNDLED:
        module = __import__(BUNDLED[name].package)
        return str(module.get_model_path())
    return name


# Task kind -> the transformers auto class its frozen model is loaded with: a classifier
# tunes on the encoder's hidden states, a language model keeps its own LM head.
AUTO_CLASSES = {"classification": "AutoModel", "causal_lm": "AutoModelForCausalLM"}


@functools.lru_cache(maxsize=4)
def load_backbone(name: str, prune: PruneKey = (), kind: str = "classification") -> Backbone:
    """The frozen backbone `name`: a bundled name ("minilm", "smollm2"), a local folder, a
    .gguf file (or a folder holding one), or an HF model id already in the local cache.
    Never downloads. `prune` (see `backbone_for`) drops transformer blocks: sorted
    indices, or a `model.prune_layers` rule string. `kind`: the task kind (`AUTO_CLASSES`),
    which decides whether the model keeps its LM head."""
    model, tokenizer = load_pretrained(name, kind)
    if not prune:
        return backbone_from_model(name, model, tokenizer)
    kept = prune_model(model, layers_to_drop(prune, model, tokenizer))
    return backbone_from_model(name, model, tokenizer, layers_kept=kept)


def backbone_for(model_cfg: ModelConfig, kind: str = "classification") -> Backbone:
    """The process-wide backbone of a `[model]` table: `backbone` with `prune_layers`,
    loaded for a task of `kind`."""
    return load_backbone(model_cfg.backbone, prune_key(model_cfg.prune_layers), kind)


def load_pretrained(name: str, kind: str = "classification"
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh, unpruned copy of `name`'s model (loaded for a task of `kind`) and its
    tokenizer (not cached)."""
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if kind not in AUTO_CLASSES:
        raise BackboneError(f"task kind {kind!r} has no model class; known: "
                            f"{', '.join(AUTO_CLASSES)}")
    auto_class = getattr(transformers, AUTO_CLASSES[kind])

    hf_logging.disable_progress_bar()  # one bar per Ray actor per run is noise, not progress
    try:
        path = resolve_backbone_path(name)
    except BackboneSourceError as exc:
        raise BackboneError(str(exc)) from None
    except (ImportError, ValueError, KeyError, RuntimeError, OSError) as exc:
        # Dequantizing a GGUF source into the cache failed (an architecture transformers
        # cannot read, metadata it lacks, a cache folder that cannot be written): one line,
        # the cause's first.
        cause = (str(exc).splitlines() or [""])[0]
        raise BackboneError(f"model.backbone={name!r}: could not prepare it "
                            f"({type(exc).__name__}: {cause})") from None
    offline = not Path(path).is_dir()
    if offline:
        # A hub id must come from the local cache; a download attempt would hang or fail late.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        model = auto_class.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise BackboneError(
            f"model.backbone={name!r} is not available offline: it is neither a bundled name "
            f"({', '.join(BUNDLED)}), a local model folder, nor in the local Hugging Face "
            f"cache ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    return model, tokenizer


def backbone_from_model(name: str, model: PreTrainedModel,
                        tokenizer: PreTrainedTokenizerBase,
                        layers_kept: tuple[int, ...] | None = None) -> Backbone:
    """A frozen `Backbone` around an already loaded model (tests build tiny random ones
    from a config). The model is put in eval mode and frozen in place. `layers_kept`: the
    original indices of its blocks when it was pruned (None: it was not)."""
    model.eval()
    model.requires_grad_(False)
    pruned = layers_kept is not None
    if layers_kept is None:
        try:
            layers_kept = tuple(range(len(derive_structure(model).layers)))
        except FamilyError:
            layers_kept = ()
    return Backbone(name=name, model=model, tokenizer=tokenizer,
                    hash=_weights_hash(model, layers_kept if pruned else None),
                    layers_kept=layers_kept)


# Config keys that name, not change, what the model computes: where it was loaded from (a
# path differs per machine), the library version that wrote it, bookkeeping of the library's
# own (the class is hashed by name; the weights' dtype by their bytes) and switches for what
# a forward returns besides the logits. Every other key is hashed: an edited config.json
# (rms_norm_eps, rope_theta, layer_norm_epsilon) moves the outputs without moving a weight.
_CONFIG_KEYS_NOT_HASHED = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "architectures", "dtype",
    "torch_dtype", "use_cache", "return_dict", "output_attentions", "output_hidden_states",
    "id2label", "label2id", "initializer_range", "_attn_implementation_autoset"})


def _weights_hash(model: torch.nn.Module, layers_kept: tuple[int, ...] | None = None) -> str:
    """The frozen model's identity: its class, its config's values that change its outputs
    (the ones differing from the class's defaults, so a library upgrade that adds a key
    with its default keeps the hash) and its weights."""
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    if layers_kept is not None:
        # Which original blocks remain, stated, not only implied by the renumbered weights.
        digest.update(f"layers_kept={list(layers_kept)}".encode())
    config = getattr(model, "config", None)
    if config is not None:
        values = {k: v for k, v in config.to_diff_dict().items()
                  if k not in _CONFIG_KEYS_NOT_HASHED}
        digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    for pname, tensor in model.state_dict().items():
        digest.update(pname.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
