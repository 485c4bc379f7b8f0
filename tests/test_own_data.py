"""A user's own data files (issue 30, item 2): errors name the file and its line, CSV/TSV
delimiters, labels validated (declared, test-only, near-duplicates), relative paths
resolved against the config file's folder."""

import json
from pathlib import Path

import pytest

from fedtune.config import ConfigError, load_config
from fedtune.data import CorpusError, load_corpus

ROWS = [("hello there", "ham"), ("buy now", "spam"), ("hi, lunch?", "ham"),
        ("cheap pills", "spam"), ("meeting at 3", "ham"), ("win a cruise", "spam"),
        ("see you", "ham"), ("free money", "spam"), ("notes attached", "ham"),
        ("act now", "spam")]


def _csv(path: Path, rows, sep: str = ",") -> Path:
    path.write_text(f"text{sep}label\n" + "".join(f'"{t}"{sep}{y}\n' for t, y in rows))
    return path


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


def _load(tmp_path: Path, data_files, **options):
    options.setdefault("path", "csv")
    return load_corpus("hf", data_files=data_files, cache_dir=str(tmp_path / "hf"), **options)


def _message(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- errors name the file and its line --------------------------------------------------

def test_a_missing_label_names_the_file_line_not_the_shuffled_row(tmp_path):
    # It said "data row 384", counted after the seeded train/test shuffle.
    rows = [*ROWS[:5], ("no label here", ""), *ROWS[5:]]
    path = _csv(tmp_path / "mail.csv", rows)
    with pytest.raises(CorpusError) as info:
        _load(tmp_path, str(path), test_fraction=0.3)
    message = _message(info)
    # header = line 1, so the sixth row is line 7
    assert f"{path} line 7" in message and "empty label" in message
    assert "data row" not in message


def test_a_missing_label_in_jsonl_counts_blank_lines_and_names_the_test_file(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", ROWS)
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text": "a", "label": "ham"}) + "\n\n"
                    + json.dumps({"text": "b", "label": None}) + "\n")
    with pytest.raises(CorpusError) as info:
        _load(tmp_path, {"train": str(train), "test": str(test)}, path="json")
    assert f"{test} line 3" in _message(info)


def test_two_training_files_each_row_keeps_its_own_file(tmp_path):
    first = _csv(tmp_path / "a.csv", ROWS[:4])
    second = _csv(tmp_path / "b.csv", [*ROWS[4:6], ("", "ham")])
    test = _csv(tmp_path / "test.csv", ROWS[6:])
    with pytest.raises(CorpusError) as info:
        _load(tmp_path, {"train": [str(first), str(second)], "test": str(test)})
    assert f"{second} line 4" in _message(info) and "empty text" in _message(info)


def test_a_glob_names_the_file_each_row_came_from(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    _csv(parts / "b.csv", [*ROWS[5:], ("no label", "")])
    _csv(parts / "a.csv", ROWS[:5])
    with pytest.raises(CorpusError) as info:
        _load(tmp_path, str(parts / "*.csv"), test_fraction=0.2)
    assert f"{parts / 'b.csv'} line 7: empty label" in _message(info)


# --- delimiters ---------------------------------------------------------------------------

def test_tsv_is_read_as_tab_separated(tmp_path):
    path = _csv(tmp_path / "mail.tsv", ROWS, sep="\t")
    corpus = _load(tmp_path, str(path), test_fraction=0.2)
    assert corpus["train"].features["label"].names == ["ham", "spam"]
    assert sorted([*corpus["train"]["text"], *corpus["test"]["text"]]) == sorted(
        t for t, _ in ROWS)


def test_the_delimiter_option(tmp_path):
    path = _csv(tmp_path / "mail.csv", ROWS, sep=";")
    corpus = _load(tmp_path, str(path), delimiter=";", test_fraction=0.2)
    assert len(corpus["train"]) + len(corpus["test"]) == len(ROWS)
    with pytest.raises(CorpusError, match="data.options.delimiter=';;' must be one character"):
        _load(tmp_path, str(path), delimiter=";;")
    jsonl = _jsonl(tmp_path / "mail.jsonl", ROWS)
    with pytest.raises(CorpusError, match="data.options.delimiter applies to path='csv'"):
        _load(tmp_path, str(jsonl), path="json", delimiter=";")


def test_a_tab_separated_file_read_as_csv_gets_a_hint(tmp_path):
    # It was pandas' bare "ParserError: ... Expected 1 fields in line 3, saw 2".
    path = _csv(tmp_path / "mail.csv", ROWS, sep="\t")
    with pytest.raises(CorpusError) as info:
        _load(tmp_path, str(path), test_fraction=0.2)
    message = _message(info)
    assert str(path) in message and "looks tab-separated" in message
    assert "data.options.delimiter = '\\t'" in message and ".tsv" in message
    assert "ParserError" not in message


def test_a_csv_and_a_tsv_together_need_a_delimiter(tmp_path):
    train = _csv(tmp_path / "train.csv", ROWS)
    test = _csv(tmp_path / "test.tsv", ROWS[:2], sep="\t")
    with pytest.raises(CorpusError, match="mixes .csv and .tsv"):
        _load(tmp_path, {"train": str(train), "test": str(test)})


# --- labels -------------------------------------------------------------------------------

def test_declared_labels_refuse_a_label_outside_them(tmp_path):
    path = _csv(tmp_path / "mail.csv", [*ROWS[:3], ("offer", "Spam"), *ROWS[3:]])
    with pytest.raises(CorpusError) as info:
        _load(tmp_path, str(path), labels=["ham", "spam"])
    message = _message(info)
    assert f"{path} line 5" in message and "'Spam'" in message and "data.labels" in message


def test_declared_labels_fix_the_class_order(tmp_path):
    path = _csv(tmp_path / "mail.csv", ROWS)
    corpus = _load(tmp_path, str(path), labels=["spam", "ham"], test_fraction=0.2)
    assert corpus["train"].features["label"].names == ["spam", "ham"]
    for split in ("train", "test"):
        ds = corpus[split]
        assert all(("spam", "ham")[y] == dict(ROWS)[t]
                   for t, y in zip(ds["text"], ds["label"], strict=True))
    # integer labels are ids into the declared list
    ints = _jsonl(tmp_path / "ints.jsonl", [(t, i % 2) for i, (t, _) in enumerate(ROWS)])
    corpus = _load(tmp_path, str(ints), path="json", labels=["ham", "spam"])
    assert corpus["train"].features["label"].names == ["ham", "spam"]
    bad = _jsonl(tmp_path / "bad.jsonl", [(t, i % 3) for i, (t, _) in enumerate(ROWS)])
    with pytest.raises(CorpusError, match=r"bad.jsonl lines 3, 6, 9: label 2 is not an id"):
        _load(tmp_path, str(bad), path="json", labels=["ham", "spam"])


def test_a_label_seen_only_in_the_test_file_is_refused_with_its_lines(tmp_path):
    train = _csv(tmp_path / "train.csv", ROWS)
    test = _csv(tmp_path / "test.csv", [("a", "ham"), ("b", "eggs"), ("c", "spam"),
                                        ("d", "eggs")])
    with pytest.raises(CorpusError) as info:
        _load(tmp_path, {"train": str(train), "test": str(test)})
    message = _message(info)
    assert "'eggs'" in message and "only in the test split" in message
    assert f"{test} lines 3, 5" in message


def test_a_test_only_integer_label_is_refused_too(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [(t, i % 2) for i, (t, _) in enumerate(ROWS)])
    test = _jsonl(tmp_path / "test.jsonl", [("a", 0), ("b", 7)])
    with pytest.raises(CorpusError, match=rf"label 7 .*only in the test split .*{test} line 2"):
        _load(tmp_path, {"train": str(train), "test": str(test)}, path="json")


def test_near_duplicate_labels_are_refused_with_their_lines(tmp_path):
    rows = [*ROWS, ("more offers", "Spam"), ("great deal", " spam")]
    path = _csv(tmp_path / "mail.csv", rows)
    with pytest.raises(CorpusError) as info:
        _load(tmp_path, str(path), test_fraction=0.2)
    message = _message(info)
    assert "'Spam'" in message and "'spam'" in message and "' spam'" in message
    assert f"{path} line 12" in message and f"{path} line 13" in message
    assert "data.labels" in message


def test_the_near_duplicate_message_names_the_first_few_lines_only(tmp_path):
    rows = ROWS + [(f"deal {i}", "SPAM") for i in range(9)]
    path = _csv(tmp_path / "mail.csv", rows)
    with pytest.raises(CorpusError) as info:
        _load(tmp_path, str(path))
    message = _message(info)
    assert f"{path} lines 12, 13, 14, 15, 16 and 4 more" in message


def test_data_labels_in_the_config():
    cfg = load_config(None, ["data.labels=['ham', 'spam']"])
    assert cfg.data.labels == ["ham", "spam"]
    assert load_config(None).data.labels == []
    for value, needle in (("['ham', 'Ham ']", "differ only in case or spaces"),
                          ("['ham', 'ham']", "twice"), ("['ham', '']", "empty"),
                          ("['ham']", "at least 2"), ("'ham'", "must be a list")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [f"data.labels={value}"])


def test_the_task_passes_declared_labels_to_the_corpus(monkeypatch):
    import fedtune.task.task as task_module

    seen = {}

    def fake(name, /, cache_root=None, labels=None, **options):
        seen.update(labels=labels)
        raise CorpusError("stop here")

    monkeypatch.setattr(task_module, "load_corpus", fake)
    cfg = load_config(None, ["data.labels=['ham', 'spam']"])
    with pytest.raises(CorpusError, match="stop here"):
        task_module._load_task(cfg, None)
    assert seen["labels"] == ["ham", "spam"]


# --- relative paths ---------------------------------------------------------------------

def _config(folder: Path, options: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "exp.toml"
    path.write_text(f'[data]\ncorpus = "hf"\noptions = {options}\n')
    return path


def test_relative_data_files_resolve_against_the_config_files_folder(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    folder = tmp_path / "project"
    config = _config(folder, '{path = "csv", data_files = "data/mail.csv"}')
    assert load_config(config).data.options["data_files"] == str(folder / "data/mail.csv")
    config = _config(folder, '{path = "csv", data_files = {train = "a.csv", '
                             'test = ["b.csv", "/abs/c.csv"]}}')
    assert load_config(config).data.options["data_files"] == {
        "train": str(folder / "a.csv"), "test": [str(folder / "b.csv"), "/abs/c.csv"]}
    # a local folder named by `path` is resolved too; a builder or hub name is not
    (folder / "mydata").mkdir()
    config = _config(folder, '{path = "mydata"}')
    assert load_config(config).data.options["path"] == str(folder / "mydata")
    config = _config(folder, '{path = "user/some-dataset", data_files = "hf://x/y.csv"}')
    options = load_config(config).data.options
    assert options == {"path": "user/some-dataset", "data_files": "hf://x/y.csv"}


def test_a_relative_path_given_with_set_resolves_against_the_current_folder(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path / "project", '{path = "csv", data_files = "x.csv"}')
    cfg = load_config(config, ["data.options.data_files=mine.csv"])
    assert cfg.data.options["data_files"] == str(tmp_path / "mine.csv")
    cfg = load_config(None, ["data.corpus=hf", "data.options={path = 'csv', "
                             "data_files = 'in/cwd.csv'}"])
    assert cfg.data.options["data_files"] == str(tmp_path / "in/cwd.csv")


def test_a_relative_backbone_folder_resolves_like_the_data_files(tmp_path, monkeypatch):
    """A model folder beside the config file is found from any current folder; a bundled
    name or a hub id that names nothing there is left as it is; --set is the current
    folder's."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "models/mine").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    folder = tmp_path / "project"
    (folder / "models/mine").mkdir(parents=True)
    config = folder / "exp.toml"
    config.write_text('[model]\nbackbone = "models/mine"\n')
    assert load_config(config).model.backbone == str(folder / "models/mine")
    for name in ("minilm", "sentence-transformers/all-mpnet-base-v2"):
        config.write_text(f'[model]\nbackbone = "{name}"\n')
        assert load_config(config).model.backbone == name
    cfg = load_config(config, ["model.backbone=models/mine"])
    assert cfg.model.backbone == str(elsewhere / "models/mine")
