"""`fedtune predict --file` on CSV, TSV and JSON Lines files (issue 30, item 5): the header is
not a text, the text column is taken, labels give an accuracy line, and a file whose format
cannot be told is refused in one line."""

import json

import numpy as np
import pytest

from fedtune.config import load_config
from fedtune.data.predict_input import PredictInputError, input_columns, read_texts

LABELS = ("ham", "spam")


def test_a_csv_file_gives_its_text_column_not_its_lines(tmp_path):
    # Every line was a text, the header included, with ",ham" glued on.
    path = tmp_path / "test.csv"
    path.write_text('text,label\n"Hello, there",ham\nbuy now,spam\n"two\nlines",ham\n')
    assert read_texts(path, LABELS) == (["Hello, there", "buy now", "two\nlines"], [0, 1, 0])


def test_a_tsv_file_and_a_csv_without_labels(tmp_path):
    tsv = tmp_path / "test.tsv"
    tsv.write_text("id\ttext\nx\thello, world\ny\tbuy now\n")
    assert read_texts(tsv, LABELS) == (["hello, world", "buy now"], None)


def test_the_runs_own_column_names_are_used(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,rating\ngreat,spam\nbad,1\n")
    columns = input_columns(load_config(None, [
        "data.corpus=hf", "data.options={path = 'csv', text_field = 'review', "
        "label_field = 'rating'}"]))
    assert columns == (("review", "text"), ("rating", "label"))
    # a label is a class name or an id
    assert read_texts(path, LABELS, columns) == (["great", "bad"], [1, 1])
    assert input_columns(load_config(None)) == (("text",), ("label",))


@pytest.mark.parametrize(("body", "needle"), [
    ("body,label\nhi,ham\n", "no text column (looked for 'text'); columns: ['body', 'label']"),
    ("text,label\nhi,ham\nyo,\n", "1 of 2 rows have a label"),
    ("text,label\nhi,eggs\n", "line 2: label 'eggs' is neither"),
    ("text,label\n", "holds no texts"),
])
def test_csv_errors_are_one_line_naming_the_file(tmp_path, body, needle):
    path = tmp_path / "in.csv"
    path.write_text(body)
    with pytest.raises(PredictInputError) as info:
        read_texts(path, LABELS)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and needle in message


@pytest.mark.parametrize("name", ["texts", "texts.xlsx", "texts.md"])
def test_a_file_whose_format_cannot_be_told_is_refused(tmp_path, name):
    path = tmp_path / name
    path.write_text("text,label\nhello,ham\n")
    with pytest.raises(PredictInputError) as info:
        read_texts(path, LABELS)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "cannot tell the format" in message and ".csv" in message and ".jsonl" in message


def test_jsonl_and_plain_text_still_read(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"text": "a", "label": "spam"}) + "\n\n"
                     + json.dumps({"text": "b", "label": 0}) + "\n")
    assert read_texts(jsonl, LABELS) == (["a", "b"], [1, 0])
    plain = tmp_path / "t.txt"
    plain.write_text("first\n\nsecond, with a comma\n")
    assert read_texts(plain, LABELS) == (["first", "second, with a comma"], None)


def test_a_file_over_the_size_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from fedtune.data import predict_input

    monkeypatch.setattr(predict_input, "MAX_INPUT_BYTES", 16)
    path = tmp_path / "t.txt"
    path.write_text("0123456789abcdef")  # 16 bytes: at the bound, read
    assert read_texts(path, LABELS) == (["0123456789abcdef"], None)
    path.write_text("0123456789abcdefg")
    with pytest.raises(PredictInputError) as info:
        read_texts(path, LABELS)
    assert "split it" in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


class _FakeTuned:
    label_names = LABELS
    cfg = load_config(None)

    def predict_proba(self, texts, batch_size=None, on_batch=None):
        # "spam" when the text says so: 2 of the 3 labelled rows below are right
        return np.array([[0.1, 0.9] if "spam" in t else [0.9, 0.1] for t in texts])


def test_predict_on_a_labelled_csv_prints_the_accuracy_line(tmp_path, cli, monkeypatch):
    import fedtune.run.export as export

    monkeypatch.setattr(export, "load_tuned", lambda folder: _FakeTuned())
    path = tmp_path / "test.csv"
    path.write_text("text,label\nsome spam,spam\nhello,ham\nsneaky,spam\n")
    res = cli("predict", str(tmp_path), "--file", str(path))
    assert res.code == 0, res.output
    assert "accuracy 0.6667 on 3 labelled rows" in res.stdout
    assert "text,label" not in res.stdout and ",ham" not in res.stdout
    (tmp_path / "x.docx").write_text("hello\n")
    res = cli("predict", str(tmp_path), "--file", str(tmp_path / "x.docx"))
    assert res.code == 2 and "cannot tell the format" in res.stdout


@pytest.mark.parametrize("odd", ["\u2028", "\u2029", "\x85"])
def test_a_valid_json_lines_file_is_read_as_its_lines(tmp_path, odd):
    """Invariant: every line of a valid JSON-lines file is one row holding its text as
    written: a Unicode line separator that JSON allows raw inside a string (U+2028, U+2029,
    U+0085; `json.dumps(..., ensure_ascii=False)` writes them so) does not end the line.
    The reader serves `fedtune predict --file` and an LM node's own texts alike."""
    from fedtune.data.predict_input import read_rows

    texts = [f"first paragraph{odd}second paragraph", "another message"]
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")
    assert len(path.read_text(encoding="utf-8").split("\n")) == 3  # two lines and the end
    try:
        rows = read_rows(path)
    except PredictInputError as exc:
        pytest.fail(f"a valid 2-line JSON-lines file was refused: {exc}")
    assert [(n, t) for n, t, _ in rows] == [(1, texts[0]), (2, texts[1])]


def test_json_lines_with_crlf_ends_are_read_and_numbered(tmp_path):
    """"\\r\\n" ends a JSON line too (JSON allows the "\\r" as whitespace); line numbers in
    errors count those lines."""
    from fedtune.data.predict_input import read_rows

    path = tmp_path / "own.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n{"text": 3}\r\n')
    with pytest.raises(PredictInputError, match=r"own\.jsonl:4: expected an object"):
        read_rows(path)
    path.write_bytes(b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    assert [(n, t) for n, t, _ in read_rows(path)] == [(1, "a"), (3, "b")]


def test_a_json_escaped_nul_is_refused_as_the_nul_byte_is(tmp_path):
    """Found by test_fuzz (data b'{"text":"\\u0000"}'): the escape got past the file's NUL
    check and a text holding NUL reached the tokenizer."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a\\u0000b"}\n')
    with pytest.raises(PredictInputError) as err:
        read_texts(path, ("ham", "spam"))
    assert str(err.value) == (f'{path}:2: the "text" string holds a NUL character (\\u0000); '
                              "give text")


def test_a_label_of_a_non_ascii_digit_is_refused_in_one_line(tmp_path):
    """Found by test_fuzz (data b'{"text":"","label":"\\u00b2"}'): "²" passed str.isdigit()
    and int() then raised a bare ValueError."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "hello", "label": "\\u00b2"}\n')
    with pytest.raises(PredictInputError, match=r"label '²' is neither one of \['ham', 'spam'\]"):
        read_texts(path, ("ham", "spam"))
    path.write_text('{"text": "hello", "label": " 1"}\n')
    assert read_texts(path, ("ham", "spam")) == (["hello"], [1])
