"""Validation and test rows are never copies of a training row (issue 26 #6): no validation
row and no test row has the normalised text or the model input of a training row, for the
default task and for a corpus with planted copies; the task records how many it kept out."""

import unicodedata
from pathlib import Path

import datasets
import numpy as np
import pytest

from fedtune.config import load_config
from fedtune.data import load_corpus, register_corpus, target_rows
from fedtune.task.task import get_task

ROOT = Path(__file__).resolve().parents[1]


def _norm(text: str) -> str:
    # Written out here rather than imported, so the check does not trust the code it checks.
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _token_rows(split, rows) -> set[bytes]:
    return {np.asarray(split.input_ids[i], dtype=np.int64).tobytes()
            + np.asarray(split.attention_mask[i], dtype=np.int64).tobytes() for i in rows}


def _copies(task, train_texts, test_texts) -> tuple[int, int]:
    """(validation rows, test rows) whose normalised text or model input equals a training
    row's: clients' rows for validation, any training row for test."""
    held = np.concatenate(task.partitions)
    client_texts = {_norm(train_texts[i]) for i in held}
    client_tokens = _token_rows(task.train, held)
    val = sum(_norm(train_texts[i]) in client_texts or _token_rows(task.train, [i]) <= client_tokens
              for i in task.validation_rows)
    all_texts = {_norm(t) for t in train_texts}
    all_tokens = _token_rows(task.train, range(len(task.train)))
    # Code from before the fix kept no test_rows: its test split was the whole corpus split.
    test_rows = getattr(task, "test_rows", np.arange(len(task.test)))
    test = sum(_norm(test_texts[r]) in all_texts or _token_rows(task.test, [i]) <= all_tokens
               for i, r in enumerate(test_rows))
    return val, test


def test_the_default_task_has_no_copy_of_a_training_row_in_validation_or_test():
    """The quickstart's data (seed 0, 64 tokens, 20 Dirichlet clients): before the fix 7 of
    468 validation rows and 14 of 1,208 test rows (13 of them copies of client rows) were
    the model input of a training row."""
    task = get_task(load_config(ROOT / "experiments/quickstart.toml"))
    corpus = load_corpus("spamassassin")
    assert _copies(task, list(corpus["train"]["text"]), list(corpus["test"]["text"])) == (0, 0)
    # The rows kept out are counted, the validation split keeps its size and no training
    # row is lost: the copies train on the clients.
    assert task.copies_removed == {"validation": 7, "test": 14}
    assert task.validation_rows.size == 468 and len(task.test) == 1208 - 14
    n_train = len(task.train)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([*task.partitions, task.validation_rows])), np.arange(n_train))
    # The test split is the corpus' test rows less the copies, in corpus order.
    assert task.test_rows.size == len(task.test) and np.all(np.diff(task.test_rows) > 0)


def test_with_two_domains_test_rows_are_target_rows_less_the_copies():
    task = get_task(load_config(ROOT / "experiments/quickstart.toml", [
        "data.num_clients=8", "data.partition=iid", "data.domain_by=collection",
        "data.target_domain=set2", "data.target_clients=4", "model.max_length=32",
        "tuning.prompt.length=4"]))
    corpus = load_corpus("spamassassin")
    target = target_rows(corpus["test"], "collection", "set2", "test")
    assert set(task.test_rows.tolist()) < set(target.tolist())
    assert task.copies_removed["test"] == target.size - task.test_rows.size > 0
    assert _copies(task, list(corpus["train"]["text"]), list(corpus["test"]["text"])) == (0, 0)


# --- a small corpus with planted copies -----------------------------------------------------

MAX_LENGTH = 16
_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
          "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


def _unique(i: int) -> str:
    """A distinct text per i, longer than MAX_LENGTH tokens, distinct in its first two words."""
    return f"note {i} " + " ".join(_WORDS[(i * 7 + k) % len(_WORDS)] for k in range(20))


TRAIN = [_unique(i) for i in range(200)]
# 20 pairs of training rows that are copies of each other: by case and spacing, or by their
# first MAX_LENGTH tokens (same opening, different tails the model never reads).
for _i in range(0, 40, 2):
    TRAIN[100 + _i] = TRAIN[_i].upper().replace(" ", "  \t ")
    TRAIN[101 + _i] = TRAIN[_i + 1] + " tail " + " ".join(_WORDS) * 2
_PLANTED_TEST = [TRAIN[150].title() + "\n", "\u3000" + TRAIN[151],  # case, spacing, NFKC
                 TRAIN[152] + " " + " ".join(_WORDS * 3),             # same first tokens
                 TRAIN[153]]                                          # verbatim
TEST = [_unique(1000 + i) for i in range(36)] + _PLANTED_TEST
# Near but not copies: they differ within the first MAX_LENGTH tokens, and stay.
TEST += ["memo" + TRAIN[154][len("note"):], "note 1550 " + TRAIN[155][len("note 155 "):]]


def _planted() -> datasets.DatasetDict:
    features = datasets.Features({"id": datasets.Value("string"),
                                  "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["ham", "spam"])})

    def split(texts, name):
        return datasets.Dataset.from_dict(
            {"id": [f"{name}-{i}" for i in range(len(texts))], "text": texts,
             "label": [i % 2 for i in range(len(texts))]}, features=features)

    return datasets.DatasetDict({"train": split(TRAIN, "train"), "test": split(TEST, "test")})


@pytest.fixture
def planted_corpus(monkeypatch):
    """The planted corpus, registered for one test only (the registry is global)."""
    from fedtune.data import corpora

    monkeypatch.setitem(corpora._CORPORA, "planted-copies", None)  # removed after the test
    register_corpus("planted-copies")(lambda: _planted())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_copies_are_kept_out_of_validation_and_test_and_counted(seed, planted_corpus):
    from fedtune.data.validation_split import carve_validation

    task = get_task(load_config(None, [
        "data.corpus=planted-copies", "data.partition=iid", "data.num_clients=4",
        "train.clients_per_round=2",
        "data.validation_fraction=0.3", f"seed={seed}", f"model.max_length={MAX_LENGTH}",
        "tuning.prompt.length=2"]))
    assert _copies(task, TRAIN, TEST) == (0, 0)
    # Exactly the four planted test copies go; the near ones stay.
    assert task.test_rows.tolist() == [*range(36), 40, 41]
    assert task.copies_removed["test"] == 4
    np.testing.assert_array_equal(task.test.labels, task.test_rows % 2)  # rows stay aligned
    # Each validation row the plain carve would draw from the 80 rows in copy pairs is
    # replaced by the next row of its label, and counted.
    labels = np.arange(len(TRAIN)) % 2
    plain = carve_validation(labels, 0.3, seed)
    in_pairs = {*range(40), *range(100, 140)}
    replaced = sum(int(r) in in_pairs for r in plain)
    assert replaced > 0 and task.copies_removed["validation"] == replaced
    assert task.validation_rows.size == plain.size == 60
    assert not in_pairs & set(task.validation_rows.tolist())


def test_normalisation_and_keys():
    from fedtune.data.duplicates import RowKeys, normalise_text

    assert normalise_text(" Hello\u00a0\tWORLD\n") == normalise_text("hello world") == \
        "hello world"
    assert normalise_text("\uff28\uff49") == "hi"  # full-width letters (NFKC)
    assert normalise_text("Straße") == normalise_text("STRASSE")  # case folding, not lower()
    ids = np.array([[1, 2, 0], [1, 2, 0], [1, 3, 0], [4, 5, 6]])
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]])
    keys = RowKeys(["a", "b", "A ", "d"], ids, mask)
    # 0/1 share their tokens, 0/2 their normalised text; 3 shares nothing.
    assert keys.repeated().tolist() == [True, True, True, False]
    other = RowKeys(["zz", "D"], ids[[2, 0]] * 0 + 9, mask[:2])
    assert keys.found_in(other).tolist() == [False, False, False, True]
    assert keys.found_in(other, among=np.array([0])).tolist() == [False] * 4
    with pytest.raises(ValueError, match="2 texts but 4 token rows"):
        RowKeys(["a", "b"], ids, mask)
