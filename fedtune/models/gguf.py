"""A GGUF file (llama.cpp's quantized format) as a cached Hugging Face model folder.

transformers reads a GGUF file with `from_pretrained(folder, gguf_file=name)` (needs the
`gguf` package) and dequantizes every tensor to float32: about 13 s for SmolLM2-135M on
two cores, on every load, in every Ray actor. It refuses `save_pretrained` on the model it
made, so the first load writes the float32 weights itself, once, into
`<cache_dir>/gguf/<key>/` (config.json, generation_config.json, model.safetensors, the
tokenizer's files, source.json) and every later load reads that folder as an ordinary model
folder.

The key is the SHA-256 of the GGUF file's content (0.07 s for 98 MB here), not its size,
modification time and name: a wheel built reproducibly stamps every file with the same
time, and a re-quantized fine-tune of the same architecture has the same size to the byte,
so only the content tells two files apart. The key also covers the libraries that convert
the tensors (`gguf`, `transformers`) and this module's LAYOUT, so an upgrade or a fix never
serves stale weights.

An entry is written into a fresh temp folder and renamed into place (fedtune.run.atomic), so
a reader sees a whole entry or none. Several Ray actors starting at once take a file lock
per key: the first dequantizes and writes, the others wait and then read its entry instead
of dequantizing the same file in parallel (each would hold ~1 GB while doing it).

What an entry under a key holds is the weights of the content the key names, whatever was
planted in a shared or restored cache folder (issue 29's attack review):
- `<cache_dir>/gguf` that is a link is never written through (refused with an OSError
  naming it, as the untrained-figures cache does: `fedtune.run.atomic.make_real_folder`);
- an entry is read only when it is a folder of its own whose every file is a regular file
  (a link to weights anywhere is not an entry: it is rebuilt) ...
- ... and whose source.json names this very content's SHA-256 and key (an entry copied
  under another key is rebuilt);
- the bytes dequantized are the bytes hashed: the GGUF is copied into the entry's private
  temp folder while it is hashed, and that copy is dequantized, so a file replaced at its
  path meanwhile (a `pip install --upgrade` while a run starts) never fills the old
  content's entry; a file replaced before the copy is refused, one line naming it.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fedtune.run.atomic import (
    fsync_folder,
    is_real_folder,
    make_real_folder,
    open_append,
    write_atomic,
    write_folder_atomic,
    write_stream_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FOLDER = "gguf"
# Bump when what an entry holds, or how it is made, changes: old entries are then missed.
LAYOUT = 1
# Libraries whose code turns the GGUF's tensors into the float32 weights an entry holds.
LIBRARIES = ("gguf", "transformers")
MODEL_FILE = "model.safetensors"
SOURCE_FILE = "source.json"
# An entry holding these is whole (it was renamed into place after they were written).
ENTRY_FILES = ("config.json", MODEL_FILE, "tokenizer_config.json", SOURCE_FILE)
# source.json is a dozen lines (about 400 bytes); a larger file is not one we wrote.
SOURCE_MAX_BYTES = 1 << 16
# The private copy of the GGUF an entry is dequantized from (in the entry's temp folder,
# removed before the entry is renamed into place).
STAGING = ".gguf-source"
_CHUNK = 1 << 20


def cache_key(gguf_file: Path) -> str:
    """The key of `gguf_file`'s entry: its content's SHA-256, LAYOUT and the versions of
    LIBRARIES (see the module's docstring for why content, not size and time)."""
    return _key(_file_sha256(gguf_file))


def _key(content_sha256: str) -> str:
    digest = hashlib.sha256(content_sha256.encode())
    digest.update(f"\0layout={LAYOUT}".encode())
    for name in LIBRARIES:
        digest.update(f"\0{name}={_version(name)}".encode())
    return digest.hexdigest()[:24]


def materialize(gguf_file: Path, cache_dir: Path) -> Path:
    """The cached model folder of `gguf_file` under `cache_dir`, dequantized and written
    on first use (under a lock per key: concurrent callers dequantize once)."""
    gguf_file = Path(gguf_file)
    root = Path(cache_dir) / FOLDER
    content = _file_sha256(gguf_file)
    key = _key(content)
    entry = root / key
    if is_real_folder(root) and _unfit(entry, content, key) is None:
        return entry
    make_real_folder(root, "GGUF cache entries")
    with _locked(root / f".{key}.lock"):
        # Another process may have written it while we waited.
        if (why := _unfit(entry, content, key)) is not None:
            if why != "missing":
                log.warning("the cache entry %s %s; it is made again", entry, why)
            log.info("dequantizing %s to float32 once; cached in %s", gguf_file, entry)
            write_folder_atomic(entry, lambda folder: _write_entry(gguf_file, content, key, folder))
    return entry


def dequantize(gguf_file: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`gguf_file` read by transformers: the causal LM in float32 and its tokenizer (the
    slow step the cache exists to run once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    # transformers draws a plain tqdm bar over the tensors ("Converting and de-quantizing"),
    # which its progress-bar switch does not reach: a quiet console gets the log line of
    # `materialize` instead (an exception still propagates).
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.float32, local_files_only=True)
    return model, tokenizer


def _write_entry(gguf_file: Path, content: str, key: str, folder: Path) -> None:
    """Fill the fresh temp `folder` with the model folder of `gguf_file`, dequantized from
    a private copy whose bytes are the ones `content` hashed (`_copy_hashed`)."""
    from safetensors.torch import save

    staging = folder / STAGING
    staging.mkdir()
    model, tokenizer = dequantize(_copy_hashed(gguf_file, content, staging))
    shutil.rmtree(staging)
    config = copy.deepcopy(model.config)
    # The GGUF loader marks the config as quantized; the weights written here are float32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    write_text_atomic(folder / "config.json", config.to_json_string())
    if getattr(model, "generation_config", None) is not None:
        write_text_atomic(folder / "generation_config.json",
                          model.generation_config.to_json_string())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = _unshared(model.state_dict(), tied)
    write_atomic(folder / MODEL_FILE, save(tensors, metadata={"format": "pt"}))
    # The tokenizer's library writes its files by name: into our fresh temp folder only.
    tokenizer.save_pretrained(folder)
    for path in folder.iterdir():
        _fsync_file(path)
    source = {"gguf_file": str(gguf_file.resolve()), "gguf_sha256": content,
              "key": key, "layout": LAYOUT,
              "libraries": {name: _version(name) for name in LIBRARIES},
              "dtype": "float32", "tie_word_embeddings": tied}
    write_text_atomic(folder / SOURCE_FILE, json.dumps(source, indent=2) + "\n")
    fsync_folder(folder)


def _unshared(state: dict, tied: bool) -> dict:
    """The state dict with each storage once (safetensors refuses shared tensors). A tied
    copy (the LM head sharing the embeddings) is left out when the config says the weights
    are tied: loading the folder ties them again. Any other shared tensor is cloned."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                 tuple(tensor.shape))
        if ident in seen:
            if tied:
                continue
            tensor = tensor.clone()
        seen.add(ident)
        out[name] = tensor.detach().contiguous()
    return out


def _copy_hashed(gguf_file: Path, content: str, staging: Path) -> Path:
    """`gguf_file` copied into the fresh folder `staging` under its own name, hashed as it
    is copied: the copy is the file `content` names, or an OSError naming the file that
    changed since it was hashed (replaced or rewritten while a run started)."""
    copy_path = staging / gguf_file.name
    digest = hashlib.sha256()

    def copy(dst: BinaryIO) -> None:
        with open(gguf_file, "rb") as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)

    write_stream_atomic(copy_path, copy)
    if digest.hexdigest() != content:
        raise OSError(f"{gguf_file} changed while it was read (SHA-256 {content[:12]}... "
                      f"then {digest.hexdigest()[:12]}...); run again once it is no longer "
                      "being replaced")
    return copy_path


def _unfit(entry: Path, content: str, key: str) -> str | None:
    """None when `entry` is a whole entry made from the GGUF content `content` under `key`;
    else why it is not ("missing" when there is none). Whole: a folder of its own (not a
    link) holding ENTRY_FILES, every file in it a regular file (lstat: a link is never
    followed), and its source.json naming `content` and `key` (not an entry of another file
    copied or restored under this key)."""
    if not os.path.lexists(entry):
        return "missing"
    if not is_real_folder(entry):
        return "is a link or not a folder"
    try:
        with os.scandir(entry) as listing:
            files = {item.name: item.is_file(follow_symlinks=False) for item in listing}
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    if odd := sorted(name for name, regular in files.items() if not regular):
        return f"holds {', '.join(odd)}, not regular files (a link is never read)"
    if missing := [name for name in ENTRY_FILES if name not in files]:
        return f"lacks {', '.join(missing)}"
    source = _read_source(entry / SOURCE_FILE)
    if source is None:
        return f"has an unreadable {SOURCE_FILE}"
    if source.get("gguf_sha256") != content or source.get("key") != key:
        return (f"was made from other content (its {SOURCE_FILE} names SHA-256 "
                f"{str(source.get('gguf_sha256'))[:12]}..., key {source.get('key')})")
    return None


def _read_source(path: Path) -> dict | None:
    """The entry's source.json as a dict, or None when it is not one we could have written
    (a link, a FIFO, over SOURCE_MAX_BYTES, not a JSON object)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > SOURCE_MAX_BYTES:
            return None
        source = json.loads(os.read(fd, SOURCE_MAX_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    return source if isinstance(source, dict) else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing, never through a link), held for
    the block; the lock is released when its process dies, so a killed writer never
    blocks the next one."""
    with open_append(path) as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"
