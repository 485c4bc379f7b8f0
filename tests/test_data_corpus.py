"""Corpus conversion and loading: the bundled SpamAssassin file and the corpus registry."""

import gzip
import json
from pathlib import Path

import pytest

import fedtune.data
from fedtune.data import CorpusError, available_corpora, corpus_options, load_corpus
from fedtune.data.build_spamassassin import convert, mailing_list, message_text, split_of, write

MULTIPART = """From: a@b.c
Subject: Re: exmh build
List-Id: Discussion list for EXMH developers <exmh-workers.example.com>
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: base64

SGVsbG8gd29ybGQsIHRoZSBidWlsZCB3b3Jrcy4=
--XX
Content-Type: text/html

<p>ignored when plain text exists</p>
--XX--
"""

HTML_ONLY = """From: x@y.z
Subject: WIN $$$ NOW
Content-Type: text/html; charset=iso-8859-1

<html><style>p {color:red}</style><body><p>Cheap&nbsp;pills &amp; more</p>
<!-- hidden --><script>evil()</script></body></html>
"""

QUOTED_PRINTABLE = """From: p@q.r
Subject: =?iso-8859-1?q?Caf=E9?= news
X-Mailing-List: <fork@xent.com> archive/latest/12
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

Caf=E9 au lait,=20
soft line=
 break
"""

# 8bit body already decoded to str (as the npm JSON holds it): must come through unchanged.
EIGHT_BIT = """From: m@n.o
Subject: prices
Sender: ilug-admin@linux.ie
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: 8bit

It costs \u20ac5 \u2014 cheap.
"""


def test_message_text_prefers_plain_and_decodes_base64():
    assert message_text(MULTIPART) == "Re: exmh build Hello world, the build works."


def test_message_text_strips_html_when_no_plain_part():
    assert message_text(HTML_ONLY) == "WIN $$$ NOW Cheap pills & more"


def test_message_text_decodes_quoted_printable_and_encoded_subject():
    assert message_text(QUOTED_PRINTABLE) == "Caf\u00e9 news Caf\u00e9 au lait, soft line break"


def test_message_text_keeps_8bit_unicode_and_truncates():
    assert message_text(EIGHT_BIT) == "prices It costs \u20ac5 \u2014 cheap."
    assert len(message_text(HTML_ONLY, max_chars=10)) == 10


def test_mailing_list_from_headers():
    assert mailing_list(MULTIPART) == "exmh-workers"
    assert mailing_list(QUOTED_PRINTABLE) == "fork"
    assert mailing_list(EIGHT_BIT) == "ilug"
    assert mailing_list("List-Post: <mailto:razor-users@example.net>\n\nbody") == "razor-users"
    # The List-Id phrase is free text; only the <label.domain> part names the list.
    assert mailing_list("List-Id: Updates to the GNOME distribution.\n <updates.ximian.com>\n\n"
                        ) == "updates"
    assert mailing_list("Mailing-List: contact ntknow-help@lists.ntk.net; run by ezmlm\n\nx"
                        ) == "ntknow"
    assert mailing_list("List-Id: <rpm-zzzlist.freshrpms.net>\n\nx") == "rpm-list"
    assert mailing_list("Sender: Jane Doe <jane@example.org>\n\nx") == ""
    assert mailing_list(HTML_ONLY) == ""


def _fake_package(tmp_path: Path, messages: list[tuple[str, str, str]]) -> Path:
    package = tmp_path / "package"
    data = package / "data"
    listing = []
    for group, name, raw in messages:
        (data / group).mkdir(parents=True, exist_ok=True)
        record = {"id": name.split(".")[0], "group": group, "text": raw}
        (data / group / f"{name}.json").write_text(json.dumps(record))
        listing.append(f"{group}/{name}.txt")
    (data / "file_list.json").write_text(json.dumps(listing))
    (package / "NOTICE").write_text("notice")
    (package / "LICENSE").write_text("license")
    return package


def test_convert_fields_dedup_split_and_deterministic_output(tmp_path):
    pkg = _fake_package(tmp_path, [
        ("easy-ham-1", "00001.aa", MULTIPART),
        ("spam-2", "00002.bb", HTML_ONLY),
        ("spam-1", "00003.cc", HTML_ONLY),  # exact duplicate text: dropped, first kept
        ("hard-ham-1", "00004.dd", QUOTED_PRINTABLE),
    ])
    records = convert(pkg)
    assert [r["id"] for r in records] == ["easy-ham-1/00001.aa", "spam-2/00002.bb",
                                          "hard-ham-1/00004.dd"]
    ham, spam, hard = records
    assert set(ham) == {"id", "text", "label", "collection", "group", "mailing_list", "split"}
    assert (ham["label"], ham["collection"], ham["mailing_list"]) == (0, "set1", "exmh-workers")
    assert (spam["label"], spam["collection"], spam["group"], spam["mailing_list"]) == (
        1, "set2", "spam-2", "")
    assert (hard["collection"], hard["mailing_list"]) == ("set1", "fork")
    assert all(r["split"] == split_of(r["id"]) for r in records)

    out = write(records, tmp_path / "out", pkg, dropped=1)
    assert (tmp_path / "out" / "NOTICE").read_text() == "notice"
    assert (tmp_path / "out" / "LICENSE").read_text() == "license"
    assert "1 exact duplicate" in (tmp_path / "out" / "README.md").read_text()
    with gzip.open(out, "rt") as fh:
        assert [json.loads(line) for line in fh] == records
    first = out.read_bytes()
    assert write(records, tmp_path / "out", pkg).read_bytes() == first  # gzip mtime=0


def test_convert_names_the_missing_listing(tmp_path):
    with pytest.raises(FileNotFoundError, match="file_list.json not found"):
        convert(tmp_path)


def test_split_rule_is_a_fixed_fifth_by_hash():
    assert split_of("easy-ham-1/00001.7c53336b37003a9286aba55d2945844c") == "train"
    ids = [f"easy-ham-1/{i:05d}.x" for i in range(3000)]
    share = sum(split_of(i) == "test" for i in ids) / len(ids)
    assert 0.17 < share < 0.23


def test_bundled_corpus_loads_with_both_labels_collections_and_disjoint_splits():
    corpus = load_corpus("spamassassin")
    train, test = corpus["train"], corpus["test"]
    for ds in (train, test):
        assert {"id", "text", "label", "collection", "group", "mailing_list"} <= set(
            ds.column_names)
        assert ds.features["label"].names == ["ham", "spam"]
        assert set(ds["label"]) == {0, 1}
        assert set(ds["collection"]) == {"set1", "set2"}
        assert all(split_of(i) == ("test" if ds is test else "train") for i in ds["id"])
        assert 0.15 < sum(ds["label"][:200]) / 200 < 0.5  # rows not grouped by label
    assert len(train) > 4000 and len(test) > 1000
    assert not set(train["id"]) & set(test["id"])
    assert not set(train["text"]) & set(test["text"])
    assert {"fork", "ilug", "rpm-list", "exmh-workers"} <= set(train["mailing_list"])


def test_bundled_corpus_ships_its_license_files():
    folder = Path(fedtune.data.__file__).parent / "spamassassin"
    assert "Stdlib Authors" in (folder / "NOTICE").read_text()
    assert "PDDL 1.0" in (folder / "LICENSE").read_text()
    assert (folder / "README.md").is_file()


def test_unknown_corpus_and_options_are_named():
    assert {"spamassassin", "hf"} <= set(available_corpora())
    with pytest.raises(CorpusError, match="data.corpus='enron' is not one of: hf, spamassassin"):
        load_corpus("enron")
    with pytest.raises(ValueError, match=r"\['colour'\] not accepted by corpus 'spamassassin'"):
        load_corpus("spamassassin", colour="red")
    with pytest.raises(CorpusError, match=r"needs data.options \['path'\]"):
        load_corpus("hf")
    assert "text_field" in corpus_options("hf")


def test_missing_and_malformed_corpus_files_name_the_file(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found: .*nope.jsonl.gz"):
        load_corpus("spamassassin", path=str(tmp_path / "nope.jsonl.gz"))
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(CorpusError, match="bad.jsonl.gz is malformed"):
        load_corpus("spamassassin", path=str(bad))
    fields = tmp_path / "fields.jsonl.gz"
    with gzip.open(fields, "wt") as fh:
        fh.write(json.dumps({"id": "a", "text": "b", "split": "train"}) + "\n")
    with pytest.raises(CorpusError, match="fields.jsonl.gz is malformed at line 1"):
        load_corpus("spamassassin", path=str(fields))


def test_hf_loader_on_local_json_with_held_out_fraction(tmp_path):
    rows = [{"body": f"message {i}", "kind": "spam" if i % 3 == 0 else "ham"} for i in range(30)]
    path = tmp_path / "mail.json"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    opts = {"path": "json", "data_files": str(path), "cache_dir": str(tmp_path / "hf")}
    corpus = load_corpus("hf", text_field="body", label_field="kind", test_fraction=0.2, **opts)
    assert len(corpus["train"]) == 24 and len(corpus["test"]) == 6
    assert corpus["train"].features["label"].names == ["ham", "spam"]
    assert {"id", "text", "label"} <= set(corpus["test"].column_names)
    assert isinstance(corpus["train"][0]["id"], str)
    again = load_corpus("hf", text_field="body", label_field="kind", test_fraction=0.2, **opts)
    assert again["test"]["text"] == corpus["test"]["text"]  # seeded hold-out
    with pytest.raises(CorpusError, match="has no column text_field='message'"):
        load_corpus("hf", text_field="message", label_field="kind", **opts)
    with pytest.raises(CorpusError, match="test_fraction=1.5 must be in"):
        load_corpus("hf", text_field="body", label_field="kind", test_fraction=1.5, **opts)
    with pytest.raises(CorpusError, match="no split test_split='validation'"):
        load_corpus("hf", text_field="body", label_field="kind", test_split="validation", **opts)


def test_hf_loader_on_local_csv_train_and_test_files(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nhello,0\nbuy now,1\nhi there,0\n")
    (tmp_path / "test.csv").write_text("text,label\ncheap pills,1\nlunch?,0\n")
    corpus = load_corpus("hf", path="csv", cache_dir=str(tmp_path / "hf"),
                         data_files={"train": str(tmp_path / "train.csv"),
                                     "test": str(tmp_path / "test.csv")})
    assert corpus["test"]["text"] == ["cheap pills", "lunch?"]
    assert corpus["train"]["label"] == [0, 1, 0]
    assert corpus["train"]["id"] == ["train-0", "train-1", "train-2"]


# --- bring-your-own files: every way a user's file can be wrong is one line naming it ----

MAIL_ROWS = [("hello there", "ham"), ("buy now", "spam"), ("hi, lunch?", "ham"),
             ("cheap pills", "spam"), ("meeting at 3", "ham"), ("win a cruise", "spam")]


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, message
    return message


def test_hf_loader_reads_csv_with_text_labels(tmp_path):
    # datasets reads CSV text as large_string, which ClassLabel cannot be cast from: this
    # was a 1,869-line ArrowInvalid traceback, while the same rows as JSON Lines loaded.
    path = tmp_path / "mail.csv"
    path.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in MAIL_ROWS))
    corpus = load_corpus("hf", path="csv", data_files=str(path), test_fraction=0.5,
                         cache_dir=str(tmp_path / "hf"))
    assert corpus["train"].features["label"].names == ["ham", "spam"]
    texts = list(corpus["train"]["text"]) + list(corpus["test"]["text"])
    labels = list(corpus["train"]["label"]) + list(corpus["test"]["label"])
    assert sorted(zip(texts, labels, strict=True)) == sorted(
        (t, ["ham", "spam"].index(y)) for t, y in MAIL_ROWS)


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("empty.csv", b"", "is empty"),
    ("empty.jsonl", b"", "is empty"),
    ("blank.json", b"\n  \n", "is empty"),
    ("latin1.csv", "text,label\nCaf\u00e9 cr\u00e8me,ham\nhi,spam\n".encode("latin-1"),
     "is not UTF-8 text"),
    ("latin1.jsonl", '{"text": "Caf\u00e9", "label": "ham"}\n'.encode("latin-1"),
     "is not UTF-8 text"),
    ("broken.jsonl", b'{"text": "a", "label": "ham"}\n{"text": "b", lab\n', "could not be read"),
])
def test_bad_bring_your_own_files_are_one_line_naming_the_file(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    builder = "csv" if name.endswith(".csv") else "json"
    with pytest.raises(CorpusError) as info:
        load_corpus("hf", path=builder, data_files=str(path), cache_dir=str(tmp_path / "hf"))
    message = _one_line(info.value)
    assert str(path) in message and needle in message


def test_missing_labels_and_texts_are_named(tmp_path):
    for name, body, needle in (("no-label.csv", "hello,ham\nbuy now,\nhi,spam\n", "label"),
                               ("no-text.csv", "hello,ham\n,spam\nhi,ham\n", "text")):
        path = tmp_path / name
        path.write_text("text,label\n" + body)
        with pytest.raises(CorpusError) as info:
            load_corpus("hf", path="csv", data_files={"train": str(path), "test": str(path)},
                        cache_dir=str(tmp_path / "hf"))
        # the line of the file (header = line 1), not a row counted after loading
        assert f"data file {path} line 3: empty {needle}" in _one_line(info.value)


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_one_class_training_data_is_refused_naming_the_label(tmp_path, suffix):
    # One class trained a 1-class head and reported accuracy 1.0.
    train, test = tmp_path / f"train.{suffix}", tmp_path / f"test.{suffix}"
    if suffix == "csv":
        train.write_text("text,label\nhello,ham\nhi,ham\nlunch,ham\n")
        test.write_text("text,label\nbuy,spam\nhey,ham\n")
    else:
        train.write_text("".join(json.dumps({"text": t, "label": 1}) + "\n"
                                 for t in ("a", "b", "c")))
        test.write_text(json.dumps({"text": "d", "label": 0}) + "\n")
    with pytest.raises(CorpusError) as info:
        load_corpus("hf", path="csv" if suffix == "csv" else "json",
                    data_files={"train": str(train), "test": str(test)},
                    cache_dir=str(tmp_path / "hf"))
    message = _one_line(info.value)
    held = "'ham'" if suffix == "csv" else "1"
    assert f"training split holds only label {held}" in message
    assert "at least 2 classes" in message


def test_bring_your_own_data_is_cached_under_fedtunes_cache(tmp_path, monkeypatch):
    # Without a cache_dir, datasets copied the user's training text into its own cache in
    # the home folder; it now lives under fedtune's cache (FEDTUNE_CACHE_DIR/datasets).
    import datasets

    hf_home = tmp_path / "hf-home-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home)
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "fedtune-cache"))
    path = tmp_path / "mail.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in MAIL_ROWS))
    corpus = load_corpus("hf", path="json", data_files=str(path), test_fraction=0.5)
    assert not hf_home.exists()
    own = tmp_path / "fedtune-cache" / "datasets"
    files = [Path(f["filename"]) for f in corpus["train"].cache_files]
    assert files and all(own in f.parents for f in files)


def test_bring_your_own_data_follows_the_configs_runtime_cache_dir(tmp_path, monkeypatch):
    # `[runtime] cache_dir` is where the token cache goes; the Arrow copy of the user's own
    # texts went to the environment's (or the default) cache instead.
    import datasets

    from fedtune.config import ExperimentConfig
    from fedtune.task.task import get_task

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-home-cache")
    monkeypatch.delenv("FEDTUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "mail.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in MAIL_ROWS))
    cfg = ExperimentConfig()
    cfg.data.corpus, cfg.data.num_clients, cfg.data.partition = "hf", 2, "iid"
    cfg.train.clients_per_round = 2
    cfg.data.validation_fraction = 0.0
    cfg.data.options = {"path": "json", "data_files": str(path), "test_fraction": 0.5}
    cfg.model.max_length = 16
    cfg.runtime.cache_dir = str(tmp_path / "configured")
    get_task(cfg)
    assert (tmp_path / "configured" / "datasets").is_dir()
    assert (tmp_path / "configured" / "tokens").is_dir()
    assert not (tmp_path / "home" / ".cache" / "fedtune").exists()
