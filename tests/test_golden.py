"""The quickstart's golden run (benchmarks/golden.py): a reproducible-noise run of the tree
under test gives the figures and final state recorded in benchmarks/golden.json, bit for bit.
One case only, to keep CI's long leg short; `python benchmarks/golden.py` checks them all.
The figures hold for one set of library versions and one CPU kind and vendor: golden.json
holds one record per environment, the test compares with this environment's and skips,
naming what differs from the nearest, where there is none. The record handling itself
(which record a check picks, what `--record` keeps) is tested here without a run."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _golden():
    spec = importlib.util.spec_from_file_location("golden", ROOT / "benchmarks" / "golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.long
def test_quickstart_reruns_to_its_golden_figures(tmp_path):
    golden = _golden()
    records = golden.load_records()
    recorded = golden.matching_record(records)
    if recorded is None:
        pytest.skip(golden.no_record_reason(records))
    out = tmp_path / "quickstart"
    # The caller holds the machine's e2e lock if it uses one (as for every slow test).
    golden.run_case("quickstart", out, lock=False)
    got, want = golden.figures(out), recorded["cases"]["quickstart"]
    assert len(want) > 100 and "checkpoint.safetensors:vector sha256" in want
    assert not golden.diff(want, got), "\n".join(golden.diff(want, got))


ENV = {"machine": "x86_64", "cpu": "AVX512", "cpu_vendor": "GenuineIntel", "torch": "2.13.0"}
AMD = {**ENV, "cpu_vendor": "AuthenticAMD"}


def test_golden_json_holds_a_record_per_environment_each_with_every_case():
    golden = _golden()
    records = golden.load_records()
    assert "records" in json.loads(golden.GOLDEN.read_text())
    environments = [r["environment"] for r in records]
    assert len(records) >= 2 and all(environments.count(e) == 1 for e in environments)
    assert {e["cpu_vendor"] for e in environments} >= {"AuthenticAMD", "GenuineIntel"}
    for record in records:
        assert set(record["cases"]) == set(golden.CASES), record["environment"]
        assert set(record["environment"]) == set(golden.environment())


def test_a_check_picks_the_record_of_its_environment_and_says_why_where_none_is(tmp_path):
    golden = _golden()
    records = [{"environment": AMD, "cases": {"quickstart": {"a": 1}}},
               {"environment": ENV, "cases": {"quickstart": {"a": 2}}}]
    assert golden.matching_record(records, ENV)["cases"]["quickstart"] == {"a": 2}
    assert golden.matching_record(records, AMD)["cases"]["quickstart"] == {"a": 1}
    elsewhere = {**ENV, "torch": "2.15.0"}
    assert golden.matching_record(records, elsewhere) is None
    reason = golden.no_record_reason(records, elsewhere)
    assert "no record for this environment" in reason and "\n" not in reason
    assert "torch: recorded 2.13.0, here 2.15.0" in reason
    assert "cpu_vendor" not in reason  # the nearest record (this vendor's) is named
    # A key the record lacks (recorded before golden.py named it) is a difference.
    old = {k: v for k, v in ENV.items() if k != "cpu_vendor"}
    assert golden.matching_record([{"environment": old, "cases": {}}], ENV) is None


def test_the_one_record_form_of_golden_json_still_loads(tmp_path):
    golden = _golden()
    path = tmp_path / "golden.json"
    path.write_text(json.dumps({"environment": AMD, "cases": {"split": {"b": 3}}}))
    assert golden.load_records(path) == [{"environment": AMD, "cases": {"split": {"b": 3}}}]
    assert golden.load_records(tmp_path / "none.json") == []


def test_record_adds_or_replaces_this_environments_record_and_keeps_the_others(
        tmp_path, monkeypatch):
    """`--record` through main(), the runs stubbed: each environment's record is its own."""
    golden = _golden()
    path = tmp_path / "golden.json"
    path.write_text(json.dumps({"environment": AMD,  # the older one-record form
                                "cases": {"quickstart": {"a": 1}, "split": {"b": 1}}}))
    figures = {"quickstart": {"a": 2}, "split": {"b": 2}}
    monkeypatch.setattr(golden, "GOLDEN", path)
    monkeypatch.setattr(golden, "run_case", lambda name, out, lock=True: 0.0)
    monkeypatch.setattr(golden, "figures", lambda out: dict(figures[out.name.split("-")[0]]))
    monkeypatch.setattr(golden, "environment", lambda: dict(ENV))
    monkeypatch.setattr(golden, "CASES", {name: golden.CASES[name] for name in figures})

    assert golden.main(["--record", "--only", "quickstart", "--no-lock"]) == 0
    records = golden.load_records(path)
    assert [r["environment"] for r in records] == [AMD, ENV]
    assert records[0]["cases"] == {"quickstart": {"a": 1}, "split": {"b": 1}}
    assert records[1]["cases"] == {"quickstart": {"a": 2}}
    # This environment's check: split is not in its record yet.
    assert golden.main(["--check", "--no-lock"]) == 1
    figures["quickstart"] = {"a": 3}
    assert golden.main(["--record", "--no-lock"]) == 0  # replaces its cases, adds split
    records = golden.load_records(path)
    assert [r["environment"] for r in records] == [AMD, ENV]
    assert records[0]["cases"] == {"quickstart": {"a": 1}, "split": {"b": 1}}
    assert records[1]["cases"] == {"quickstart": {"a": 3}, "split": {"b": 2}}
    assert golden.main(["--check", "--no-lock"]) == 0
    figures["split"] = {"b": 4}
    assert golden.main(["--check", "--no-lock"]) == 1  # a figure of its own record differs


def test_a_check_with_no_record_for_its_environment_skips_saying_why(tmp_path, monkeypatch,
                                                                     capsys):
    golden = _golden()
    path = tmp_path / "golden.json"
    path.write_text(json.dumps({"records": [{"environment": AMD,
                                             "cases": {"quickstart": {"a": 1}}}]}))
    ran = []
    monkeypatch.setattr(golden, "GOLDEN", path)
    monkeypatch.setattr(golden, "run_case", lambda name, out, lock=True: ran.append(name) or 0.0)
    monkeypatch.setattr(golden, "figures", lambda out: {"a": 1})
    monkeypatch.setattr(golden, "environment", lambda: dict(ENV))
    assert golden.main(["--check", "--only", "quickstart", "--no-lock"]) == 0
    assert ran == []
    out = capsys.readouterr().out
    assert "SKIPPED" in out and "cpu_vendor: recorded AuthenticAMD, here GenuineIntel" in out
    # --nearest compares with the nearest record anyway, saying what differs.
    assert golden.main(["--check", "--only", "quickstart", "--no-lock", "--nearest"]) == 0
    assert ran == ["quickstart"]
    assert "environment differs" in capsys.readouterr().out
