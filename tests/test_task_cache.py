"""The task cache: a repeat run of a task reads its tokens, partitions, validation rows and
labels from disk instead of loading, tokenizing and partitioning the corpus; the key
changes with anything that shapes them, and a broken entry is rebuilt."""

import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import fedtune.task.task as task_module
from fedtune.config import load_config
from fedtune.data import corpus_sources
from fedtune.data.corpora import SPAMASSASSIN_FILE
from fedtune.runtime.startup import PREFIX, StartupReport, reporting
from fedtune.task import cache as task_cache
from fedtune.task.task import data_key, task_key

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.num_clients=6", "model.max_length=32", "tuning.prompt.length=4"]
BUNDLED = ROOT / "fedtune" / "data" / "spamassassin" / SPAMASSASSIN_FILE


def _cfg(*extra: str):
    return load_config(ROOT / "experiments/quickstart.toml", [*SETS, *extra])


def _build(cfg) -> tuple[object, list[str]]:
    """Build the task past the process cache, returning it and its start-up phases."""
    lines: list[str] = []
    with reporting(StartupReport(lines.append)):
        task = task_module._build_task.__wrapped__(task_key(cfg), cfg.to_toml())
    return task, [line[len(PREFIX) + 1:].split(" ")[0] for line in lines]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _same_task(a, b) -> None:
    assert a.label_names == b.label_names and a.spec.hash == b.spec.hash
    for split in ("train", "test"):
        for column in ("input_ids", "attention_mask", "labels"):
            np.testing.assert_array_equal(getattr(getattr(a, split), column),
                                          getattr(getattr(b, split), column))
    assert len(a.partitions) == len(b.partitions)
    for p, q in zip(a.partitions, b.partitions, strict=True):
        np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(a.validation_rows, b.validation_rows)
    np.testing.assert_array_equal(a.test_rows, b.test_rows)
    assert a.copies_removed == b.copies_removed and set(a.copies_removed) == {"validation",
                                                                               "test"}


def test_a_repeat_build_reads_the_task_from_the_cache_without_the_corpus(cache, monkeypatch):
    cfg = _cfg("seed=11")
    first, phases = _build(cfg)
    assert phases == ["model", "data", "tokenize", "partitions"]
    (entry,) = (cache / task_cache.FOLDER).iterdir()
    assert not entry.name.startswith(".")  # renamed into place, no temporary left

    def no_corpus(*args, **kwargs):
        raise AssertionError("the corpus was loaded although the task is cached")

    monkeypatch.setattr(task_module, "load_corpus", no_corpus)
    monkeypatch.setattr(task_module, "partition", no_corpus)
    again, phases = _build(cfg)
    assert phases == ["model", "task"]
    _same_task(first, again)
    assert isinstance(again.partitions[0], np.ndarray) and len(again.partitions) == 6
    # Another method on the same data reads the same entry, with its own model and spec.
    lora, phases = _build(_cfg("seed=11", "tuning.method=lora"))
    assert phases == ["model", "task"] and lora.spec.hash != first.spec.hash
    np.testing.assert_array_equal(lora.validation_rows, first.validation_rows)
    # Another seed is another task: built, not read.
    monkeypatch.undo()
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(cache))
    assert _build(_cfg("seed=12"))[1] == ["model", "data", "tokenize", "partitions"]
    assert len(list((cache / task_cache.FOLDER).iterdir())) == 2


def test_the_key_follows_config_corpus_file_tokenizer_and_versions(tmp_path, monkeypatch):
    corpus = tmp_path / SPAMASSASSIN_FILE
    shutil.copy(BUNDLED, corpus)
    options = {"path": str(corpus)}
    fields = data_key(_cfg())
    key = task_cache.entry_key(fields, "spamassassin", options, b"tok")
    assert key == task_cache.entry_key(fields, "spamassassin", options, b"tok")
    for other in ("seed=1", "model.max_length=48", "data.alpha=0.3"):
        assert key != task_cache.entry_key(data_key(_cfg(other)), "spamassassin", options, b"tok")
    # The method and the privacy settings shape the model, not the data.
    assert data_key(_cfg("tuning.method=lora", "privacy.sample.enabled=false")) == fields
    assert key != task_cache.entry_key(fields, "spamassassin", options, b"other tokenizer")
    stat = corpus.stat()
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the file changed
    assert key != (touched := task_cache.entry_key(fields, "spamassassin", options, b"tok"))
    monkeypatch.setattr(task_cache, "_version", lambda name: "0.0.1")  # an upgrade
    assert touched != task_cache.entry_key(fields, "spamassassin", options, b"tok")


def test_only_corpora_that_list_their_local_files_are_cached(tmp_path):
    assert corpus_sources("spamassassin", {}) == [BUNDLED]
    assert corpus_sources("spamassassin", {"path": str(tmp_path / "none.gz")}) is None
    data = tmp_path / "mail.csv"
    data.write_text("text,label\nhi,0\n")
    assert corpus_sources("hf", {"path": "csv", "data_files": str(data)}) == [data]
    assert corpus_sources("hf", {"path": "csv", "data_files": [str(data), "remote.csv"]}) is None
    assert corpus_sources("hf", {"path": "some-user/some-dataset"}) is None
    assert corpus_sources("hf", {"path": str(tmp_path)}) == [data]
    assert task_cache.entry_key("{}", "hf", {"path": "imdb"}, b"tok") is None


def test_an_unreadable_entry_is_rebuilt_and_stored_again(cache, caplog):
    cfg = _cfg("seed=13")
    first, _ = _build(cfg)
    (entry,) = (cache / task_cache.FOLDER).iterdir()
    (entry / "partitions.npy").write_bytes(b"not an array")
    with caplog.at_level(logging.WARNING, logger="fedtune.task.task"):
        again, phases = _build(cfg)
    assert phases == ["model", "data", "tokenize", "partitions"]
    assert "unreadable" in caplog.text and entry.name in caplog.text
    _same_task(first, again)
    assert _build(cfg)[1] == ["model", "task"]  # the rebuilt entry reads again


def test_an_entry_whose_parts_disagree_is_not_used(cache):
    cfg = _cfg("seed=14")
    _build(cfg)
    (entry,) = (cache / task_cache.FOLDER).iterdir()
    rows = np.load(entry / "validation_rows.npy")
    np.save(entry / "validation_rows.npy", rows + 10**6)  # rows past the training split
    assert _build(cfg)[1] == ["model", "data", "tokenize", "partitions"]


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_run(cache, caplog):
    cache.mkdir(parents=True)
    (cache / task_cache.FOLDER).write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="fedtune.task.task"):
        task, _ = _build(_cfg("seed=15"))
    assert len(task.partitions) == 6 and "could not store" in caplog.text


def test_the_key_covers_the_code_that_carves_the_splits(tmp_path):
    """A change to the split rules (the validation carve, the copy rule of issue 26 #6) gives
    every task a new key, so entries written by older code are never read."""
    package = Path(task_cache.__file__).resolve().parents[1]
    copy = tmp_path / "fedtune"
    for name in task_cache.CODE:
        source = package / name
        if source.is_dir():
            shutil.copytree(source, copy / name)
        else:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, copy / name)
    assert task_cache._code_digest(copy) == task_cache._code_digest()
    digests = {task_cache._code_digest()}
    for rule in ("data/duplicates.py", "data/validation_split.py", "task/task.py"):
        path = copy / rule
        original = path.read_bytes()
        path.write_bytes(original + b"\n# changed\n")
        digests.add(task_cache._code_digest(copy))
        path.write_bytes(original)
    assert len(digests) == 4


# The untrained model's figures (issue 28 #5): computed once per task, read by every later run.
EVAL = ["train.eval_max_examples=48"]


def test_cached_untrained_figures_equal_a_fresh_evaluation_bit_for_bit(tmp_path, monkeypatch):
    import fedtune.task.evaluation as evaluation
    from fedtune.task.task import get_task

    cfg = _cfg(*EVAL)
    task = get_task(cfg)  # built with the session's cache; the figures go to an empty one
    model = task.new_model()
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(cache))
    first = evaluation.untrained_metrics(task, model, cfg)  # computed, then stored
    key = evaluation.untrained_cache_key(task, model, cfg)
    stored = cache / task_cache.UNTRAINED_FOLDER / key / task_cache.UNTRAINED_FILE
    assert stored.is_file()

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the untrained model was evaluated although its figures are cached")

    with monkeypatch.context() as patched:
        patched.setattr(evaluation, "initial_metrics", no_evaluation)
        again = evaluation.untrained_metrics(task, model, cfg)
    fresh = evaluation.initial_metrics(task, model, task.initial_vector(), cfg)
    assert first == again == fresh and again.keys() == fresh.keys()  # equal floats: same bits
    assert all(type(again[k]) is type(fresh[k]) for k in fresh)
    # An entry that cannot be read is computed again, never trusted.
    for broken in ('{"test_accuracy": 0.5}', '{"test_accuracy": "0.5", "test_loss": 1.0, '
                   '"val_accuracy": null, "val_loss": null}', "not json"):
        stored.write_text(broken)
        assert task_cache.read_untrained(cache, key) is None
    assert evaluation.untrained_metrics(task, model, cfg) == fresh
    assert task_cache.read_untrained(cache, key) == fresh  # and stored again


def test_the_untrained_key_follows_everything_that_changes_the_figures(monkeypatch):
    import dataclasses

    import torch

    from fedtune.task.evaluation import untrained_cache_key
    from fedtune.task.task import Split, get_task

    base_task = get_task(_cfg(*EVAL))
    base_model = base_task.new_model()

    def key(*extra: str, task=None, rebuild: bool = False) -> str:
        """The key under `extra`, with `task` (default: the base task); the task and model
        are rebuilt only where `extra` shapes the model."""
        cfg = _cfg(*EVAL, *extra)
        if rebuild:
            task = get_task(cfg)
            return untrained_cache_key(task, task.new_model(), cfg)
        return untrained_cache_key(task or base_task, base_model, cfg)

    base = key()
    assert base == key()
    # Training, privacy and run settings, and the partitions, never touch the figures.
    assert key("train.rounds=7", "train.lr=0.5", "privacy.sample.enabled=false",
               "train.clients_per_round=3", "name=other", "data.num_clients=5") == base

    def edited(split: str, column: str, row: int) -> object:
        """The base task with one evaluated value changed."""
        old = getattr(base_task, split)
        arrays = {c: np.array(getattr(old, c)) for c in ("input_ids", "attention_mask",
                                                         "labels")}
        arrays[column][row] = 1 - arrays[column][row] if column == "labels" else \
            arrays[column][row] + 1
        task = dataclasses.replace(base_task, **({"test": Split(**arrays)} if split == "test"
                                                 else {}))
        if split == "validation":
            task.__dict__["validation"] = Split(**arrays)  # the cached property's value
        return task

    changed = {f"{split}.{column}": key(task=edited(split, column, 0))
               for split in ("test", "validation")
               for column in ("input_ids", "attention_mask", "labels")}
    # Rows past the evaluation's cap are not read: they change nothing.
    assert key(task=edited("test", "labels", len(base_task.test) - 1)) == base
    changed |= {extra: key(extra) for extra in (
        "seed=3", "model.max_length=24", "train.eval_batch_size=16",
        "train.eval_max_examples=40")}
    changed |= {extra: key(extra, rebuild=True) for extra in (
        "tuning.prompt.length=5", "tuning.method=lora", "tuning.prompt.layer=2")}
    # The evaluation's path counts, not the setting: with a frozen prefix, the cached states
    # (equal within float tolerance) or the whole model; without one, the same path.
    changed["prefix cache off"] = key("tuning.prompt.layer=2", "train.prefix_cache=off",
                                      rebuild=True)
    assert key("train.prefix_cache=off") == base
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        changed["threads"] = key()
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(task_cache, "_version", lambda name: "0.0.1")  # an upgrade
    changed["versions"] = key()
    monkeypatch.undo()
    digest = task_cache._code_digest

    def code_changed(package=None, names=task_cache.CODE):
        return digest(package, names) + (b"x" if names == task_cache.UNTRAINED_CODE else b"")

    monkeypatch.setattr(task_cache, "_code_digest", code_changed)  # a fix in the model code
    changed["code"] = key()
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed
    # The key's own parts: the rows' values, dtype and shape, and every field.
    rows, fields = [np.arange(6).reshape(2, 3)], {"backbone": "b", "spec": "s", "threads": 2}
    first = task_cache.untrained_key(rows, fields)
    for other in ([np.arange(1, 7).reshape(2, 3)], [np.arange(6).reshape(3, 2)],
                  [np.arange(6, dtype=np.int8).reshape(2, 3)]):
        assert task_cache.untrained_key(other, fields) != first
    for name in fields:
        assert task_cache.untrained_key(rows, {**fields, name: "other"}) != first


# Moved here from tests/test_attack28_cache.py (a review's reproducers, assertions kept): ATTACK28
# (issue 28, target 3): the untrained-figures cache (new in issue 28) with planted

KEY = "0" * 24


def _entry(cache_dir: Path) -> Path:
    folder = cache_dir / task_cache.UNTRAINED_FOLDER / KEY
    folder.mkdir(parents=True)
    return folder / task_cache.UNTRAINED_FILE


def test_a_deeply_nested_untrained_entry_is_a_miss_not_a_crash(tmp_path: Path):
    """read_untrained returns None for a malformed (deeply nested) entry; it never raises."""
    _entry(tmp_path).write_text("[" * 200_000)
    try:
        got = task_cache.read_untrained(tmp_path, KEY)
    except RecursionError as exc:  # untrained_metrics runs after the last round: no summary
        raise AssertionError("a malformed cache entry raised RecursionError") from exc
    assert got is None


def test_a_fifo_planted_as_an_untrained_entry_never_hangs_the_run(tmp_path: Path):
    """read_untrained never blocks on a FIFO planted as metrics.json."""
    path = _entry(tmp_path)
    os.mkfifo(path)
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(task_cache.read_untrained(tmp_path, KEY)),
                              daemon=True)
    thread.start()
    thread.join(3.0)
    blocked = thread.is_alive()
    if blocked:  # release the reader: a writer opens and closes the FIFO
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(3.0)
    assert not blocked, "read_untrained blocked on a FIFO: the run hangs after its last round"
    assert got == [None]


def test_storing_untrained_figures_never_writes_through_a_link_planted_in_the_cache(tmp_path):
    """store_untrained never writes through a link planted as <cache_dir>/untrained."""
    cache_dir = tmp_path / "shared-cache"
    cache_dir.mkdir()
    elsewhere = tmp_path / "victim-folder"
    elsewhere.mkdir()
    (cache_dir / task_cache.UNTRAINED_FOLDER).symlink_to(elsewhere)
    figures = {name: 0.5 for name in task_cache.UNTRAINED_FIELDS}
    try:
        task_cache.store_untrained(cache_dir, KEY, figures)
    except OSError:
        pass  # refusing the link holds (untrained_metrics logs it and goes on)
    assert list(elsewhere.iterdir()) == [], "the cache entry was written through a planted link"


def test_the_untuned_rouge_is_measured_once_the_library_that_computes_it_is_there(
        lm_folders, tmp_path, monkeypatch):
    """Invariant: a cached untrained figure is served only where the code that computed it
    would compute the same now: a null test_rouge_l stored for want of rouge-score (the lm
    extra) is not served once rouge-score is installed."""
    import importlib.util

    from fedtune.task.evaluation import untrained_metrics
    from fedtune.task.task import get_task
    from tests.lm_fixtures import write_users

    if importlib.util.find_spec("rouge_score") is None:
        pytest.skip("the lm extra (rouge-score) is not installed")
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    data = write_users(tmp_path / "mail.jsonl")
    cfg = load_config(None, [f'model.backbone="{lm_folders["llama"]}"', "task.kind=causal_lm",
                             "data.corpus=hf", f'data.options={{path="json", data_files='
                             f'"{data}", test_fraction=0.25}}', "data.partition=natural",
                             "data.by=user", "data.num_clients=3", "train.clients_per_round=2",
                             "model.max_length=24", "tuning.method=lora",
                             "task.generation_examples=4", "task.generation_prompt_tokens=4",
                             "task.generation_new_tokens=2"])
    task = get_task(cfg)
    model = task.new_model()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "rouge_score"
                        else real(name, *a, **k))
    without = untrained_metrics(task, model, cfg)  # a plain install: null, with a warning
    assert without["test_rouge_l"] is None
    monkeypatch.setattr(importlib.util, "find_spec", real)  # the lm extra installed
    again = untrained_metrics(task, model, cfg)
    assert again["test_rouge_l"] is not None, (
        "initial_test_rouge_l is the null cached before rouge-score was installed")


# From the second LM review (LMATTACK2 finding 9), its assertion kept; the task carries its
# backbone's tokenizer, as a real one does (it decides which texts ROUGE-L can score).
ROUGE_LENGTH, ROUGE_CAP = 32, 4


def _rouge_split(tail_seed: int, changed_row: int | None = None):
    """Test rows: the first ROUGE_CAP short texts (too short for the generation metric),
    then long ones drawn from `tail_seed` (the ones ROUGE-L is computed on)."""
    from fedtune.task.rows import Split

    rng = np.random.default_rng(tail_seed)
    ids = np.zeros((ROUGE_CAP + 8, ROUGE_LENGTH), dtype=np.int32)
    mask = np.zeros_like(ids)
    ids[:ROUGE_CAP, :3], mask[:ROUGE_CAP, :3] = 7, 1
    ids[ROUGE_CAP:] = rng.integers(2000, 3000, size=(8, ROUGE_LENGTH))
    mask[ROUGE_CAP:] = 1
    if changed_row is not None:
        ids[changed_row] += 1
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    return Split(ids, mask, labels)


def test_the_untrained_rouge_key_covers_the_texts_it_is_computed_on():
    """Invariant: two tasks whose untrained test_rouge_l is computed on different texts
    never share an untrained-figures key; a text neither figure reads changes nothing."""
    import importlib.util
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from fedtune.models.backbone import resolve_backbone_path
    from fedtune.task.evaluation import untrained_cache_key

    if importlib.util.find_spec("rouge_score") is None:
        pytest.skip("rouge-score (the lm extra) is not installed")
    cfg = load_config(None, ["task.kind=causal_lm", "data.partition=iid",
                             f"model.max_length={ROUGE_LENGTH}",
                             f"train.eval_max_examples={ROUGE_CAP}",
                             "task.generation_examples=4", "task.generation_prompt_tokens=8",
                             "task.generation_new_tokens=4", "data.validation_fraction=0"])
    model = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]), prefix=None,
                            method="lora")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))

    def key(test) -> str:
        task = SimpleNamespace(test=test, validation=None, num_labels=0,
                               backbone=SimpleNamespace(hash="b" * 16, tokenizer=tokenizer),
                               spec=SimpleNamespace(hash="s" * 16))
        return untrained_cache_key(task, model, cfg)

    keys = [key(_rouge_split(tail)) for tail in (1, 2)]
    assert not np.array_equal(_rouge_split(1).input_ids[ROUGE_CAP:],
                              _rouge_split(2).input_ids[ROUGE_CAP:])
    assert keys[0] != keys[1], (
        f"both test splits key {keys[0]}: the key holds only their first {ROUGE_CAP} rows "
        "(train.eval_max_examples), while the untrained ROUGE-L is computed on the later, "
        "different texts; the second run is served the first one's untuned ROUGE-L")
    # The four texts ROUGE-L scores follow the four short ones; the last row is read by
    # neither figure, while a scored text's later tokens (past prompt + reference) are not
    # read either.
    assert key(_rouge_split(1, changed_row=ROUGE_CAP + 7)) == keys[0]
    assert key(_rouge_split(1, changed_row=ROUGE_CAP + 3)) != keys[0]
    tail = _rouge_split(1)
    tail.input_ids[ROUGE_CAP, 8 + 4:] += 1
    assert key(tail) == keys[0]
