"""The quickstart's golden run (benchmarks/golden.py): a reproducible-noise run of the tree
under test gives the figures and final state recorded in benchmarks/golden.json, bit for bit.
One case only, to keep CI's long leg short; `python benchmarks/golden.py` checks them all.
The figures hold for the recorded library versions and CPU kind: elsewhere the test skips,
naming what differs."""

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
    recorded = json.loads(golden.GOLDEN.read_text())
    if differences := golden.environment_differences(recorded):
        pytest.skip("golden figures recorded elsewhere: " + "; ".join(differences))
    out = tmp_path / "quickstart"
    # The caller holds the machine's e2e lock if it uses one (as for every slow test).
    golden.run_case("quickstart", out, lock=False)
    got, want = golden.figures(out), recorded["cases"]["quickstart"]
    assert len(want) > 100 and "checkpoint.safetensors:vector sha256" in want
    assert not golden.diff(want, got), "\n".join(golden.diff(want, got))
