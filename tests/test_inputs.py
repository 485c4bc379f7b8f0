"""Inputs a user hands the CLI: each wrong one is one line naming the file or flag."""

import json

import pytest
from typer.testing import CliRunner

from fedtune.data.predict_input import PredictInputError, check_predict_options, read_texts
from fedtune.run.ledger import LedgerError, count_rounds, read_rounds

LABELS = ("ham", "spam")


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, message
    return message


@pytest.mark.parametrize("name", ["model.safetensors", "texts.txt", "texts.jsonl"])
def test_binary_input_files_are_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01\x02fedtune\x00\xff\xfe" * 8)
    with pytest.raises(PredictInputError) as info:
        read_texts(path, LABELS)
    assert f"{path} is not text" in _one_line(info.value)


def test_non_utf8_input_is_named_with_the_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok line\nCaf\u00e9\n".encode("latin-1"))
    with pytest.raises(PredictInputError) as info:
        read_texts(path, LABELS)
    assert f"{path} is not UTF-8 text (byte 11" in _one_line(info.value)


def test_folder_and_empty_input_files_are_named(tmp_path):
    with pytest.raises(PredictInputError, match="is a folder, not a file"):
        read_texts(tmp_path, LABELS)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(PredictInputError, match="empty.txt holds no texts"):
        read_texts(empty, LABELS)


@pytest.mark.parametrize("batch_size", [0, -4])
def test_batch_size_below_one_is_refused(batch_size):
    # A negative batch size classified nothing and then crashed with an IndexError.
    with pytest.raises(PredictInputError) as info:
        check_predict_options(batch_size, None)
    assert _one_line(info.value) == f"--batch-size must be >= 1, got {batch_size}"


def test_out_that_is_a_folder_or_has_no_folder_is_refused(tmp_path):
    with pytest.raises(PredictInputError) as info:
        check_predict_options(None, tmp_path)
    assert _one_line(info.value) == f"--out {tmp_path} is a folder; give a file path"
    with pytest.raises(PredictInputError, match="folder .*nope does not exist"):
        check_predict_options(8, tmp_path / "nope" / "out.jsonl")
    check_predict_options(8, tmp_path / "out.jsonl")
    check_predict_options(None, None)


def test_predict_proba_refuses_a_batch_size_below_one():
    from fedtune.run.export import TunedClassifier

    with pytest.raises(ValueError, match="batch_size must be >= 1, got -1"):
        TunedClassifier.predict_proba(None, ["a"], batch_size=-1)  # type: ignore[arg-type]


# --- rounds.jsonl cut off mid-write -----------------------------------------------------------

def _ledger(folder, lines: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rounds.jsonl").write_text(lines)


def test_a_cut_last_line_is_named_by_the_reader(tmp_path):
    full = json.dumps({"round": 1, "accuracy": 0.5}) + "\n"
    _ledger(tmp_path, full + '{"round": 2, "accur')
    with pytest.raises(LedgerError) as info:
        read_rounds(tmp_path)
    message = _one_line(info.value)
    assert f"{tmp_path / 'rounds.jsonl'}:2" in message and "cut off mid-write" in message
    assert count_rounds(tmp_path) == 1  # a live run's progress counts complete lines only


def test_damaged_ledger_lines_are_named(tmp_path):
    _ledger(tmp_path, '{"round": 1}\nnot json\n{"round": 3}\n')
    with pytest.raises(LedgerError, match=r"rounds.jsonl:2 is not JSON"):
        read_rounds(tmp_path)
    _ledger(tmp_path, '{"round": 1}\n[1, 2]\n')
    with pytest.raises(LedgerError, match=r"rounds.jsonl:2 is not a round record"):
        read_rounds(tmp_path)
    _ledger(tmp_path, '{"round": 1}\n\n{"round": 2}\n')
    assert [r["round"] for r in read_rounds(tmp_path)] == [1, 2]


def test_report_on_a_truncated_ledger_is_one_line(tmp_path):
    from fedtune.cli import app
    from fedtune.config import load_config

    run = tmp_path / "run"
    _ledger(run, json.dumps({"round": 1, "accuracy": 0.5, "bytes_up": 10}) + "\n"
            + '{"round": 2, "accuracy": 0.6, "by')
    (run / "config.toml").write_text(load_config(None).to_toml())
    (run / "summary.json").write_text(json.dumps({"final_accuracy": 0.6, "epsilon_sample": 1.0,
                                                  "epsilon_user": None}))
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "cut off mid-write" in result.output and "Traceback" not in result.output


def test_report_on_a_damaged_summary_is_one_line(tmp_path):
    from fedtune.cli import app
    from fedtune.config import load_config

    run = tmp_path / "run"
    _ledger(run, json.dumps({"round": 1, "val_accuracy": 0.5, "bytes_up": 10}) + "\n")
    (run / "config.toml").write_text(load_config(None).to_toml())
    (run / "summary.json").write_text('{"final_accuracy": 0.6, "epsil')
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 2, result.output
    assert "summary.json is not JSON" in result.output and "Traceback" not in result.output
