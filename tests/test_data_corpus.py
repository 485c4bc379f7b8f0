"""Corpus conversion and loading: the bundled SpamAssassin file and the corpus registry."""

import gzip
import json

import pytest

from fedtune.data import CorpusError, available_corpora, load_corpus
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


def test_message_text_prefers_plain_and_decodes_transfer_encoding():
    assert message_text(MULTIPART) == "Re: exmh build Hello world, the build works."


def test_message_text_strips_html_when_no_plain_part():
    assert message_text(HTML_ONLY) == "WIN $$$ NOW Cheap pills & more"


def test_message_text_truncates():
    assert len(message_text(HTML_ONLY, max_chars=10)) == 10


def test_mailing_list_from_headers():
    assert mailing_list(MULTIPART) == "exmh-workers"
    assert mailing_list("List-Post: <mailto:razor-users@example.net>\n\nbody") == "razor-users"
    assert mailing_list(HTML_ONLY) == ""


def _fake_package(tmp_path, messages):
    data = tmp_path / "package" / "data"
    listing = []
    for group, name, raw in messages:
        (data / group).mkdir(parents=True, exist_ok=True)
        (data / group / f"{name}.json").write_text(json.dumps({"id": name, "group": group,
                                                               "text": raw}))
        listing.append(f"{group}/{name}.txt")
    (data / "file_list.json").write_text(json.dumps(listing))
    (tmp_path / "package" / "NOTICE").write_text("notice")
    return tmp_path / "package"


def test_convert_fields_dedup_and_split(tmp_path):
    pkg = _fake_package(tmp_path, [
        ("easy-ham-1", "00001.aa", MULTIPART),
        ("spam-2", "00002.bb", HTML_ONLY),
        ("spam-1", "00003.cc", HTML_ONLY),  # exact duplicate text: dropped
    ])
    records = convert(pkg)
    assert [r["id"] for r in records] == ["easy-ham-1/00001.aa", "spam-2/00002.bb"]
    ham, spam = records
    assert (ham["label"], ham["collection"], ham["mailing_list"]) == (0, "set1", "exmh-workers")
    assert (spam["label"], spam["collection"], spam["group"]) == (1, "set2", "spam-2")
    assert all(r["split"] == split_of(r["id"]) for r in records)
    out = write(records, tmp_path / "out", pkg)
    assert (tmp_path / "out" / "NOTICE").read_text() == "notice"
    with gzip.open(out, "rt") as fh:
        assert [json.loads(line)["id"] for line in fh] == [r["id"] for r in records]
    # Deterministic bytes: rebuilding gives the identical file.
    first = out.read_bytes()
    assert write(records, tmp_path / "out", pkg).read_bytes() == first


def test_split_rule_is_about_a_fifth():
    ids = [f"easy-ham-1/{i:05d}.x" for i in range(2000)]
    share = sum(split_of(i) == "test" for i in ids) / len(ids)
    assert 0.17 < share < 0.23


def test_bundled_corpus_loads_with_both_labels_collections_and_disjoint_splits():
    corpus = load_corpus("spamassassin")
    train, test = corpus["train"], corpus["test"]
    assert {"id", "text", "label", "collection", "group", "mailing_list"} <= set(train.column_names)
    assert train.features["label"].names == ["ham", "spam"]
    assert len(train) > 4000 and len(test) > 1000
    for ds in (train, test):
        assert set(ds["label"]) == {0, 1}
        assert set(ds["collection"]) == {"set1", "set2"}
    assert not set(train["id"]) & set(test["id"])
    assert not set(train["text"]) & set(test["text"])
    assert len(set(train["mailing_list"]) - {""}) >= 10


def test_unknown_corpus_lists_the_available_ones():
    with pytest.raises(CorpusError, match="is not one of: hf, spamassassin"):
        load_corpus("enron")
    assert {"spamassassin", "hf"} <= set(available_corpora())


def test_missing_and_malformed_corpus_files_name_the_file(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found: .*nope.jsonl.gz"):
        load_corpus("spamassassin", path=str(tmp_path / "nope.jsonl.gz"))
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(CorpusError, match="bad.jsonl.gz is malformed"):
        load_corpus("spamassassin", path=str(bad))
    with pytest.raises(CorpusError, match="data.options for corpus 'spamassassin'"):
        load_corpus("spamassassin", colour="red")


def test_hf_loader_on_local_files(tmp_path):
    rows = [{"body": f"message {i}", "kind": "spam" if i % 3 == 0 else "ham"} for i in range(30)]
    path = tmp_path / "mail.json"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus("hf", path="json", data_files=str(path), text_field="body",
                         label_field="kind", test_fraction=0.2)
    assert len(corpus["train"]) == 24 and len(corpus["test"]) == 6
    assert corpus["train"].features["label"].names == ["ham", "spam"]
    assert {"id", "text", "label"} <= set(corpus["test"].column_names)
    with pytest.raises(CorpusError, match="has no column 'message'"):
        load_corpus("hf", path="json", data_files=str(path), text_field="message",
                    label_field="kind")
