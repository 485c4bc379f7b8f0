"""The GGUF cache (fedtune.models.gguf) in a user's cache folder that holds a planted link,
an entry copied under another key, or a GGUF file replaced while it is dequantized (issue
29's attack review, findings 1-4).

The cache promises that an entry under a key holds the float32 weights of the GGUF content
that key names, written into a fresh folder and never through a link, as its sibling cache
(fedtune.task.cache, the untrained figures) does. Each test builds one situation a user's
machine can reach (a cache folder shared or restored from a backup, a `pip install
--upgrade` of the bundled package while a run starts, a cache folder pointed elsewhere by a
link) on a 60 KB tiny Llama GGUF (tests/gguf_tiny.py) and checks that invariant.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="the lm extra (gguf) is not installed")

EMBEDDINGS = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny GGUF files of the same architecture and size, different weights."""
    from gguf_tiny import write_tiny_llama_gguf

    root = tmp_path_factory.mktemp("gguf")
    return {"a": write_tiny_llama_gguf(root / "a" / "tiny.gguf", seed=0),
            "b": write_tiny_llama_gguf(root / "b" / "tiny.gguf", seed=1)}


@pytest.fixture(scope="module")
def genuine(ggufs, tmp_path_factory) -> dict[str, object]:
    """Each file's embeddings as a clean cache dequantizes them (the reference)."""
    from fedtune.models import gguf

    root = tmp_path_factory.mktemp("clean-cache")
    return {name: _embeddings(gguf.materialize(path, root)) for name, path in ggufs.items()}


def _embeddings(entry: Path):
    from safetensors.torch import load_file

    return load_file(str(entry / "model.safetensors"))[EMBEDDINGS]


def _holds(entry: Path, expected) -> bool:
    import torch

    return torch.equal(_embeddings(entry), expected)


def test_a_linked_gguf_cache_folder_is_never_written_through(ggufs, tmp_path):
    """Invariant: the GGUF cache writes no entry through a link planted as `<cache>/gguf`
    (THREATS 7; as the untrained-figures cache refuses a linked root)."""
    from fedtune.models import gguf

    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    cache.mkdir()
    elsewhere.mkdir()
    (cache / gguf.FOLDER).symlink_to(elsewhere, target_is_directory=True)
    try:
        gguf.materialize(ggufs["a"], cache)
    except OSError:
        pass  # refusing the linked folder is one way to hold the invariant
    assert list(elsewhere.iterdir()) == [], sorted(p.name for p in elsewhere.iterdir())


def test_an_entry_whose_weights_file_is_a_link_is_not_read(ggufs, genuine, tmp_path):
    """Invariant: an entry whose files are links (to weights anywhere) is not whole: the
    GGUF's own weights are served (rebuilt), never a link's target."""
    from fedtune.models import gguf

    cache = tmp_path / "cache"
    entry = gguf.materialize(ggufs["a"], cache)
    foreign = tmp_path / "foreign.safetensors"
    shutil.copy(gguf.materialize(ggufs["b"], tmp_path / "other-cache") / gguf.MODEL_FILE,
                foreign)
    (entry / gguf.MODEL_FILE).unlink()
    (entry / gguf.MODEL_FILE).symlink_to(foreign)
    served = gguf.materialize(ggufs["a"], cache)
    assert not (served / gguf.MODEL_FILE).is_symlink(), "a linked weights file was served"
    assert _holds(served, genuine["a"])


def test_an_entry_made_from_other_content_is_not_read(ggufs, genuine, tmp_path):
    """Invariant: an entry is served for a GGUF only when it was made from that content
    (its own source.json names another file's sha256 and key: a copied or planted entry)."""
    from fedtune.models import gguf

    cache = tmp_path / "cache"
    made_from_b = gguf.materialize(ggufs["b"], cache)
    key_a = gguf.cache_key(ggufs["a"])
    shutil.copytree(made_from_b, cache / gguf.FOLDER / key_a)
    served = gguf.materialize(ggufs["a"], cache)
    assert _holds(served, genuine["a"]), (
        f"{served} (source.json: key {gguf.cache_key(ggufs['b'])}) served b's weights for a")


def test_a_gguf_replaced_while_dequantized_never_fills_the_old_contents_entry(
        ggufs, genuine, tmp_path, monkeypatch):
    """Invariant: the entry under a content key holds the weights of that content, even when
    the file at the path is replaced between hashing and dequantizing (a package upgrade
    while a run starts): refused, or the bytes hashed are the bytes dequantized."""
    from fedtune.models import gguf

    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    shutil.copy(ggufs["a"], path)
    key_a = gguf.cache_key(path)
    real = gguf.dequantize

    def replaced_first(gguf_file):
        # The file is replaced (renamed over, as pip does) after materialize hashed it.
        staged = path.with_suffix(".new")
        shutil.copy(ggufs["b"], staged)
        os.replace(staged, path)
        return real(gguf_file)

    monkeypatch.setattr(gguf, "dequantize", replaced_first)
    cache = tmp_path / "cache"
    try:
        gguf.materialize(path, cache)
    except (OSError, ValueError, RuntimeError):
        pass  # refusing a file that changed while read holds the invariant too
    monkeypatch.undo()
    entry = cache / gguf.FOLDER / key_a
    if entry.is_dir():
        assert _holds(entry, genuine["a"]), (
            f"the entry keyed by a's content ({key_a}) holds b's weights: every later load "
            "of a reads b")
    # And the next load of the genuine a serves a's weights.
    assert _holds(gguf.materialize(ggufs["a"], cache), genuine["a"])


def test_a_linked_gguf_cache_folder_is_refused_in_one_line_naming_it(ggufs, tmp_path):
    from fedtune.models import gguf

    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    cache.mkdir()
    elsewhere.mkdir()
    (cache / gguf.FOLDER).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OSError) as exc:
        gguf.materialize(ggufs["a"], cache)
    message = str(exc.value)
    assert "\n" not in message
    assert str(cache / gguf.FOLDER) in message and "FEDTUNE_CACHE_DIR" in message


def test_a_gguf_replaced_before_it_is_copied_is_refused_and_leaves_no_entry(
        ggufs, tmp_path, monkeypatch):
    """The file changes between the hash that chose the key and the copy that is
    dequantized: one line naming the file, and nothing under the key (nor staged copies)."""
    from fedtune.models import gguf

    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    shutil.copy(ggufs["a"], path)
    key_a = gguf.cache_key(path)
    real_locked = gguf._locked

    def replaced_then_locked(lock_path):
        staged = path.with_suffix(".new")
        shutil.copy(ggufs["b"], staged)
        os.replace(staged, path)
        return real_locked(lock_path)

    monkeypatch.setattr(gguf, "_locked", replaced_then_locked)
    cache = tmp_path / "cache"
    with pytest.raises(OSError) as exc:
        gguf.materialize(path, cache)
    message = str(exc.value)
    assert "\n" not in message and str(path) in message and "changed while it was read" in message
    assert not (cache / gguf.FOLDER / key_a).exists()
    assert [p.name for p in (cache / gguf.FOLDER).iterdir()] == [f".{key_a}.lock"]


def test_an_entry_with_an_unreadable_source_is_made_again(ggufs, genuine, tmp_path, caplog):
    from fedtune.models import gguf

    cache = tmp_path / "cache"
    entry = gguf.materialize(ggufs["a"], cache)
    (entry / gguf.SOURCE_FILE).write_text("[]")
    with caplog.at_level("WARNING", logger=gguf.__name__):
        served = gguf.materialize(ggufs["a"], cache)
    assert served == entry and _holds(served, genuine["a"])
    assert f"unreadable {gguf.SOURCE_FILE}" in caplog.text
    assert json.loads((served / gguf.SOURCE_FILE).read_text())["key"] == entry.name


# Findings 4-6 of the second attack review (lmattack2). The cache's claim is about OTHER
# users and about accidents: whoever can write files as you can also edit the installed
# package, so no check here defends against your own account (see the module's docstring).


def _plant_consistent_entry(ggufs, cache: Path, tmp_path: Path) -> Path:
    """b's entry copied under a's key, its source.json lying consistently: a's content
    SHA-256 and a's key (both computable from the public GGUF) and b's files' own hashes."""
    from fedtune.models import gguf

    other = gguf.materialize(ggufs["b"], tmp_path / "other")
    key_a = gguf.cache_key(ggufs["a"])
    gguf.materialize(ggufs["a"], cache)  # makes the root as fedtune does
    planted = cache / gguf.FOLDER / key_a
    shutil.rmtree(planted)
    shutil.copytree(other, planted)
    source = json.loads((planted / gguf.SOURCE_FILE).read_text())
    source.update(gguf_sha256=gguf._file_sha256(ggufs["a"]), key=key_a)
    (planted / gguf.SOURCE_FILE).write_text(json.dumps(source))
    return planted


@pytest.mark.parametrize("opened", ["entry folder", "weights file"])
def test_an_entry_another_user_could_write_is_not_served(
        ggufs, genuine, tmp_path, caplog, opened):
    """Invariant (finding 4, adapted to the adversary the cache defends against): an entry
    that the group or others can write (a shared or restored cache) is never served, even
    when its source.json lies consistently (a's content SHA-256 and key, b's file hashes):
    it is made again from the GGUF, with a warning."""
    from fedtune.models import gguf

    cache = tmp_path / "cache"
    planted = _plant_consistent_entry(ggufs, cache, tmp_path)
    target = planted if opened == "entry folder" else planted / gguf.MODEL_FILE
    os.chmod(target, os.stat(target).st_mode | 0o022)
    with caplog.at_level("WARNING", logger=gguf.__name__):
        served = gguf.materialize(ggufs["a"], cache)
    assert _holds(served, genuine["a"]), (
        f"{served} served b's weights for a from an entry its group/others could write "
        f"({opened} group- and other-writable)")
    assert "writable by group or others" in caplog.text
    assert os.stat(served).st_mode & 0o022 == 0
    assert all(os.stat(p).st_mode & 0o022 == 0 for p in served.iterdir())


def test_a_gguf_cache_folder_others_can_write_is_refused_in_one_line(ggufs, tmp_path):
    """Invariant: a `<cache>/gguf` the group or others can write is refused (anyone there
    could plant or replace an entry), one line naming it and the fix; nothing is read."""
    from fedtune.models import gguf

    cache = tmp_path / "cache"
    gguf.materialize(ggufs["a"], cache)
    root = cache / gguf.FOLDER
    os.chmod(root, 0o777)
    with pytest.raises(OSError) as exc:
        gguf.materialize(ggufs["a"], cache)
    message = str(exc.value)
    assert "\n" not in message and str(root) in message
    assert "writable by group or others" in message and "chmod go-w" in message


def test_a_new_gguf_cache_folder_is_not_writable_by_others_under_umask_002(ggufs, tmp_path):
    """The cache's own folders never start open to the group (umask 002 is common)."""
    from fedtune.models import gguf

    old = os.umask(0o002)
    try:
        entry = gguf.materialize(ggufs["a"], tmp_path / "cache")
    finally:
        os.umask(old)
    for path in (entry.parent, entry, *entry.iterdir()):
        assert os.stat(path).st_mode & 0o022 == 0, f"{path}: {oct(os.stat(path).st_mode)}"


def test_an_entry_whose_weights_were_corrupted_is_made_again(ggufs, genuine, tmp_path, caplog):
    """An accident (a disk error, a half-restored backup): one byte of the weights changed,
    same size, same time. source.json records each file's SHA-256, checked on every load."""
    from fedtune.models import gguf

    cache = tmp_path / "cache"
    entry = gguf.materialize(ggufs["a"], cache)
    weights = entry / gguf.MODEL_FILE
    info = os.stat(weights)
    with open(weights, "r+b") as fh:
        fh.seek(info.st_size - 1)
        last = fh.read(1)
        fh.seek(info.st_size - 1)
        fh.write(bytes([last[0] ^ 0x01]))
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))
    with caplog.at_level("WARNING", logger=gguf.__name__):
        served = gguf.materialize(ggufs["a"], cache)
    assert _holds(served, genuine["a"])
    assert f"{gguf.MODEL_FILE}, which does not match the SHA-256" in caplog.text


def test_an_entry_whose_weights_file_is_a_hard_link_is_not_read(ggufs, tmp_path):
    """Invariant: an entry file that is a link (hard or symbolic) to a file elsewhere is not
    read ("a link to weights anywhere is not an entry: it is rebuilt")."""
    import torch

    from fedtune.models import gguf

    cache = tmp_path / "cache"
    entry = gguf.materialize(ggufs["a"], cache)
    genuine = _embeddings(entry)
    # A file outside the cache, owned by whoever planted the link, who may rewrite it at any
    # time: here b's weights.
    outside = tmp_path / "outside.safetensors"
    shutil.copy(gguf.materialize(ggufs["b"], tmp_path / "other") / gguf.MODEL_FILE, outside)
    (entry / gguf.MODEL_FILE).unlink()
    os.link(outside, entry / gguf.MODEL_FILE)
    served = gguf.materialize(ggufs["a"], cache)
    assert os.stat(served / gguf.MODEL_FILE).st_nlink == 1 and bool(torch.equal(
        _embeddings(served), genuine)), (
        "a hard-linked weights file (lstat: a regular file) was served: the file outside "
        "the cache decides a's weights")


def test_no_entry_file_is_written_through_a_link_planted_in_the_fresh_folder(
        ggufs, tmp_path, monkeypatch):
    """Invariant: making an entry writes nothing outside the cache, even when a link is
    planted in the entry's temp folder while the GGUF is dequantized (seconds for SmolLM2):
    every file of the entry through the atomic writer, no library handed the folder to write
    into by name."""
    from fedtune.models import gguf

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    real = gguf.dequantize

    def racing(gguf_file: Path):
        out = real(gguf_file)
        # The entry's temp folder is the staging folder's parent (`_write_entry`).
        (gguf_file.parent.parent / "tokenizer.json").symlink_to(victim)
        return out

    monkeypatch.setattr(gguf, "dequantize", racing)
    try:
        gguf.materialize(ggufs["a"], tmp_path / "cache")
    except OSError:
        pass  # refusing the planted link holds the invariant too
    assert victim.read_text() == "the user's own file\n", (
        "tokenizer.save_pretrained wrote the entry's tokenizer.json through a link planted "
        "in its temp folder, overwriting a file outside the cache")


def test_the_folder_an_entry_is_built_in_is_private(ggufs, tmp_path, monkeypatch):
    """While the GGUF is dequantized (seconds), the entry's temp folder and the staged copy's
    folder are the user's alone (0700), whatever the umask: no other user plants a file or
    link in them."""
    from fedtune.models import gguf

    modes = {}
    real = gguf.dequantize

    def watching(gguf_file: Path):
        modes["staging"] = stat_mode(gguf_file.parent)
        modes["entry"] = stat_mode(gguf_file.parent.parent)
        return real(gguf_file)

    def stat_mode(path: Path) -> int:
        return os.lstat(path).st_mode & 0o777

    monkeypatch.setattr(gguf, "dequantize", watching)
    old = os.umask(0o002)
    try:
        gguf.materialize(ggufs["a"], tmp_path / "cache")
    finally:
        os.umask(old)
    assert modes == {"staging": 0o700, "entry": 0o700}, {k: oct(v) for k, v in modes.items()}
