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

What the cache promises, and against whom (issue 29's attack reviews). Whoever can write
files as this user can also edit the installed fedtune, so no check here defends against
them: an entry planted by this user, with a source.json that lies consistently, is served.
The promise is about other local users (a shared or restored cache folder) and accidents
(a partial, corrupted or linked entry): an entry is served only when
- `<cache_dir>/gguf` is a real folder (never a link: refused with an OSError naming it,
  `fedtune.run.atomic.make_real_folder`), this user's own and not writable by the group or
  others (refused likewise: anyone there could plant or replace an entry;
  `fedtune.run.atomic.make_own_folder`; made 0755 whatever the umask);
- the entry is a folder of its own, this user's, not writable by the group or others,
  holding exactly the files its source.json lists, each a regular file with one link
  (never a symbolic or hard link to a file elsewhere), this user's and not writable by the
  group or others; any other entry is made again, with a warning;
- its source.json names this very content's SHA-256 and key (an entry copied under another
  key is rebuilt) and each file's SHA-256, checked on every load (a corrupted or partly
  restored file is rebuilt). Its price, measured for SmolLM2's 540 MB entry on two shared
  cores at load average 8 (page cache warm): materialize takes 0.45 s instead of 0.07 s,
  the in-process load 0.68-0.83 s instead of 0.31-0.50 s, once per worker;
- the entry is built in a private temp folder (0700: nothing is planted in it while the
  GGUF is dequantized) and every file of it goes through the atomic writer (the tokenizer's
  library writes by name into a private scratch folder, whose bytes are then copied);
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
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fedtune.run.atomic import (
    fsync_folder,
    is_real_folder,
    make_own_folder,
    not_own,
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
# An entry's folder once in place: readable by all (the weights are public), writable by
# this user only, whatever the umask (an entry others could write is never served).
ENTRY_MODE = 0o755
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
    root = make_own_folder(Path(cache_dir) / FOLDER, "GGUF cache entries")
    content = _file_sha256(gguf_file)
    key = _key(content)
    entry = root / key
    if _unfit(entry, content, key) is None:
        return entry
    with _locked(root / f".{key}.lock"):
        # Another process may have written it while we waited.
        if (why := _unfit(entry, content, key)) is not None:
            if why != "missing":
                log.warning("the cache entry %s %s; it is made again", entry, why)
            log.info("dequantizing %s to float32 once; cached in %s", gguf_file, entry)
            write_folder_atomic(entry, lambda folder: _write_entry(gguf_file, content, key, folder),
                                mode=ENTRY_MODE)
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
    """Fill the fresh private temp `folder` with the model folder of `gguf_file`,
    dequantized from a private copy whose bytes are the ones `content` hashed
    (`_copy_hashed`); every file through the atomic writer, its SHA-256 in source.json."""
    from safetensors.torch import save

    staging = folder / STAGING
    staging.mkdir(mode=0o700)
    model, tokenizer = dequantize(_copy_hashed(gguf_file, content, staging))
    shutil.rmtree(staging)
    config = copy.deepcopy(model.config)
    # The GGUF loader marks the config as quantized; the weights written here are float32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    files = {"config.json": config.to_json_string().encode()}
    if getattr(model, "generation_config", None) is not None:
        files["generation_config.json"] = model.generation_config.to_json_string().encode()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    files[MODEL_FILE] = save(_unshared(model.state_dict(), tied), metadata={"format": "pt"})
    files.update(_tokenizer_files(tokenizer, folder))
    for name, data in files.items():
        write_atomic(folder / name, data)
    source = {"gguf_file": str(gguf_file.resolve()), "gguf_sha256": content,
              "key": key, "layout": LAYOUT,
              "libraries": {name: _version(name) for name in LIBRARIES},
              "dtype": "float32", "tie_word_embeddings": tied,
              "files": {name: hashlib.sha256(data).hexdigest()
                        for name, data in sorted(files.items())}}
    write_text_atomic(folder / SOURCE_FILE, json.dumps(source, indent=2) + "\n")
    fsync_folder(folder)


def _tokenizer_files(tokenizer: PreTrainedTokenizerBase, folder: Path) -> dict[str, bytes]:
    """The tokenizer's files as bytes by name. Its library writes files by name, so it
    writes into a private scratch folder (mkdtemp, 0700) inside `folder`, removed after:
    the entry's own files are then written by the atomic writer, never by the library."""
    scratch = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=folder))
    try:
        tokenizer.save_pretrained(scratch)
        out = {}
        for path in sorted(scratch.iterdir()):
            # Its modes follow the umask: the scratch folder is private, the files the
            # atomic writer makes from these bytes are not writable by group or others.
            fd = _open_own(path, owner_only=False)
            if isinstance(fd, str):
                raise OSError(f"{path}: the tokenizer's library wrote a file that {fd}; "
                              "not cached")
            with os.fdopen(fd, "rb") as fh:
                out[path.name] = fh.read()
        return out
    finally:
        shutil.rmtree(scratch)


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
    """None when `entry` is a whole entry made from the GGUF content `content` under `key`
    and unchanged since; else why it is not ("missing" when there is none). Whole: a
    folder of its own (not a link, this user's, not writable by group or others) holding
    exactly the files its source.json lists and source.json, each a regular file with one
    link, this user's and not writable by group or others (`_open_own`: a link is never
    followed), its source.json naming `content` and `key` (not an entry of another file
    copied or restored under this key) and each file's SHA-256, which the file matches."""
    if not os.path.lexists(entry):
        return "missing"
    if not is_real_folder(entry):
        return "is a link or not a folder"
    if why := not_own(os.lstat(entry)):
        return f"is {why}"
    try:
        with os.scandir(entry) as listing:
            names = sorted(item.name for item in listing)
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    if missing := [name for name in ENTRY_FILES if name not in names]:
        return f"lacks {', '.join(missing)}"
    source = _read_source(entry / SOURCE_FILE)
    if isinstance(source, str):
        return source
    if source.get("gguf_sha256") != content or source.get("key") != key:
        return (f"was made from other content (its {SOURCE_FILE} names SHA-256 "
                f"{str(source.get('gguf_sha256'))[:12]}..., key {source.get('key')})")
    hashes = source.get("files")
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        return f"has no file hashes in its {SOURCE_FILE} (made by an older fedtune)"
    if extra := sorted(set(names) - set(hashes) - {SOURCE_FILE}):
        return f"holds {', '.join(extra)}, which its {SOURCE_FILE} does not list"
    if missing := sorted(set(hashes) - set(names)):
        return f"lacks {', '.join(missing)}, which its {SOURCE_FILE} lists"
    # Every file's kind, owner and mode first (cheap), then the hashes (the weights last).
    fds = {}
    try:
        for name in sorted(hashes, key=lambda name: name == MODEL_FILE):
            fd = _open_own(entry / name)
            if isinstance(fd, str):
                return f"holds {name}, which {fd}"
            fds[name] = fd
        for name, fd in fds.items():
            with os.fdopen(os.dup(fd), "rb") as fh:
                if hashlib.file_digest(fh, "sha256").hexdigest() != hashes[name]:
                    return (f"holds {name}, which does not match the SHA-256 its "
                            f"{SOURCE_FILE} records (corrupted or changed)")
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    finally:
        for fd in fds.values():
            os.close(fd)
    return None


def _open_own(path: Path, owner_only: bool = True) -> int | str:
    """`path` opened to read (never through a link, never waiting on a FIFO) when it is a
    regular file with one link and (`owner_only`) this user's and not writable by group or
    others; else why it is not (a str), the file left closed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot be opened as a file ({exc.strerror}; a link is never read)"
    info = os.fstat(fd)
    why = None
    if not stat.S_ISREG(info.st_mode):
        why = "is not a regular file"
    elif info.st_nlink != 1:
        why = f"has {info.st_nlink} hard links (another name may be outside the cache)"
    elif owner_only and (owner := not_own(info)):
        why = f"is {owner}"
    if why is not None:
        os.close(fd)
        return why
    return fd


def _read_source(path: Path) -> dict | str:
    """The entry's source.json as a dict, or why it is not one we could have written (a
    link, a FIFO, another user's, over SOURCE_MAX_BYTES, not a JSON object)."""
    fd = _open_own(path)
    if isinstance(fd, str):
        return f"holds {SOURCE_FILE}, which {fd}"
    unreadable = f"has an unreadable {SOURCE_FILE}"
    try:
        if os.fstat(fd).st_size > SOURCE_MAX_BYTES:
            return unreadable
        source = json.loads(os.read(fd, SOURCE_MAX_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return unreadable
    finally:
        os.close(fd)
    return source if isinstance(source, dict) else unreadable


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


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"
