"""What crosses the wire is what the statement says (THREATS.md class 3): real in-process
runs per mode record every record key a reply carries and every tensor the split body
receives, and the recorded set must equal the statement generated from the wire-field
table; counts and losses stay home under DP; FLOPs are measured on synthetic text."""

import json

import pytest
import torch
from inline_grid import TINY, RecordingBody, inline_run

from clients import split as split_client
from clients.train import local_train
from fedtune.config import load_config
from fedtune.models import load_backbone
from fedtune.privacy import DPHistory
from fedtune.split import InProcessBody, SplitPromptModel
from fedtune.split import flops as split_flops_module
from fedtune.split.cut import SplitBackbone
from fedtune.tuning import build_tuned_model

pytestmark = pytest.mark.usefixtures("task_identity")

SMASHED = ["split.enabled=true", "split.smashed_dp.enabled=true",
           "split.smashed_dp.noise_multiplier=1.0", "privacy.sample.noise_multiplier=1.0"]
COUNT_KEYS = {"metrics.num-examples", "metrics.examples-seen", "metrics.split-examples",
              "metrics.local-loss-examples", "metrics.loss", "metrics.flops"}


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("minilm")


def _data(n=24, length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2900, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 4, length // 2:] = 0  # data[0] has a real, partial mask
    return torch.utils.data.TensorDataset(ids, mask, torch.randint(0, 2, (n,), generator=g))


def test_flop_measurement_sends_no_client_data_and_is_counted(minilm, monkeypatch):
    """26 #4: measuring split FLOPs sent data[0]'s cut-layer states to the body unclipped,
    with its real mask, outside the traffic count."""
    cfg = load_config(None, ["split.enabled=true", "split.smashed_dp.enabled=true",
                             "train.batch_size=4", "tuning.prompt.length=4",
                             "train.local_steps=2", "privacy.reproducible_noise=true",
                             "split.smashed_dp.activation_clip_norm=3.0",
                             # Tiny noise: rows at the clip are what the check sees.
                             "split.smashed_dp.noise_multiplier=1e-6",
                             "privacy.sample.accountant=rdp"])
    model = build_tuned_model(minilm, cfg.tuning, 2, seed=0)
    view = SplitPromptModel(model, SplitBackbone(minilm.model, cfg.split.cut_layer))
    recorder = RecordingBody(InProcessBody(view.split))
    monkeypatch.setattr(split_client, "config_body", lambda _cfg: recorder)
    split_flops_module._CACHE.clear()
    data = _data()
    step = split_client.split_step(view, cfg, 2, n=len(data), seed=3)
    local_train(view, data, cfg, DPHistory(), seed=3, step=step)
    step.flops(view, data, 2)
    forwards = [t for k, t in recorder.tensors if k == "body.forward.activations"]
    masks = [t for k, t in recorder.tensors if k == "body.forward.attention_mask"]
    assert forwards and all(bool((m == 1).all()) for m in masks)  # no length leaves
    for rows in forwards:
        assert float(rows.reshape(rows.shape[0], -1).norm(dim=1).max()) <= 3.0 + 1e-3
    probes = [t for k, t in recorder.tensors if k == "body.probe.activations"]
    assert len(probes) == 1
    with torch.no_grad():
        mine, _ = view.cut(data.tensors[0][:1], data.tensors[1][:1])
    assert not torch.allclose(probes[0], mine, atol=1e-3)  # not the client's first row
    probe_masks = [t for k, t in recorder.tensors if k == "body.probe.attention_mask"]
    assert all(bool((m == 1).all()) for m in probe_masks)
    # The probe is traffic: metered and reported (`probe-bytes`).
    assert step.probe.traffic.exchanges == 1 and step.body.traffic.exchanges == 2
    assert step.extras()["probe-bytes"] == (step.probe.traffic.bytes_up
                                            + step.probe.traffic.bytes_down) > 0


def test_scoring_flops_use_no_client_row(minilm, monkeypatch):
    cfg = load_config(None, ["split.enabled=true", "tuning.prompt.length=4"])
    model = build_tuned_model(minilm, cfg.tuning, 2, seed=0)
    view = SplitPromptModel(model, SplitBackbone(minilm.model, cfg.split.cut_layer))
    recorder = RecordingBody(InProcessBody(view.split))
    monkeypatch.setattr(split_client, "config_body", lambda _cfg: recorder)
    scorer = split_client.SplitScorer(view, cfg)
    data = _data()
    scorer.client_flops(data)
    sent = [t for k, t in recorder.tensors if k.endswith("activations")]
    assert sent and all(k.startswith("body.probe") for k, _ in recorder.tensors)
    assert scorer.probe.traffic.exchanges == 1 and scorer.body.traffic.exchanges == 0


def _rounds(out):
    return [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]


USER = ["privacy.sample.enabled=false", "privacy.user.enabled=true",
        "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=50",
        "privacy.user.clipping=client",
        "train.clients_per_round=3"]  # q = 1: every client in the cohort
# name -> (overrides, marks expected beside epsilon_sample on the console)
MODES = {
    "plain": (["privacy.sample.enabled=false"], ""),
    "sample-dp-seeded": (["privacy.reproducible_noise=true"], " [seeded noise]"),
    "sample-dp-disclosed": (["privacy.disclose_counts=true"], " [counts disclosed]"),
    "split-in-clear": (["split.enabled=true", "privacy.sample.enabled=false"],
                       "off [data in clear]"),
    "split-smashed-dp": (SMASHED, ""),
    "user-dp": (USER, ""),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_what_a_real_run_sends_is_what_its_statement_says(tmp_path, monkeypatch, mode):
    """THREATS.md class 3: record every key each reply carries and every tensor the split
    body receives in a real (in-process) run, and compare with the generated statement.
    26 #5: under DP no count, real-row count or loss leaves the client (this failed for
    sample-level DP and smashed DP before `privacy.disclose_counts`)."""
    from fedtune.wire.fields import conditional_keys, expected_keys, statement, withholds_counts

    sets, console_mark = MODES[mode]
    cfg = load_config(None, [*TINY, *sets])
    out = tmp_path / "run"
    summary, grid, body = inline_run(cfg, out, monkeypatch)
    expected = expected_keys(cfg)
    # No node of the inline run trains on its own file, so none sends its own count.
    own_file = conditional_keys(cfg)
    assert own_file == {"discovery reply": {"roster.own-examples"}}
    assert grid.keys["discovery reply"] == expected["discovery reply"] - own_file[
        "discovery reply"]
    assert grid.keys["train reply"] == expected["train reply"]
    if cfg.split.enabled:
        assert body.keys == expected["split body"]
    else:
        assert "split body" not in expected
    if cfg.privacy.sample.enabled and not cfg.privacy.disclose_counts:
        assert withholds_counts(cfg) and not COUNT_KEYS & grid.keys["train reply"]
    rounds = _rounds(out)
    assert rounds[0]["privacy_in_clear"] == json.loads(json.dumps(statement(cfg)))
    _check_marks(mode, cfg, out, rounds, summary, console_mark)
    if mode == "user-dp":
        _check_curator_log(out, rounds, summary, cfg)


def _check_marks(mode, cfg, out, rounds, summary, console_mark):
    """26 #6: every output of the run shows each epsilon's marks."""
    from fedtune.cli import round_line, summary_line, sweep_epsilons
    from fedtune.run.export import export_run

    line = round_line(rounds[0], cfg)
    final = summary_line(summary, out, cfg)
    sweep = sweep_epsilons({"folder": str(out), **summary})
    manifest = json.loads((export_run(out, out.parent / "export") / "fedtune.json")
                          .read_text())
    for record in (rounds[0], summary, manifest):
        assert set(record) >= {"epsilon_sample_note", "epsilon_user_note"}
        for level in ("sample", "user"):
            assert (record[f"epsilon_{level}_note"] is None) == (
                record[f"epsilon_{level}"] is None)
    if console_mark:
        tag = console_mark.split("[")[1]
        assert f"[{tag}" in line and f"[{tag}" in final and f"[{tag}" in sweep[0]
        if summary["epsilon_sample"] is not None:
            note = tag.rstrip("]")
            assert note in rounds[0]["epsilon_sample_note"]
            assert note in summary["epsilon_sample_note"]
            assert note in manifest["epsilon_sample_note"]
    else:
        assert "[" not in line and "[" not in sweep[0] + sweep[1]


def _check_curator_log(out, rounds, summary, cfg):
    """26 #6: under user-level DP rounds.jsonl named the secret Poisson cohort and each
    client's unclipped norm, loss and n."""
    from fedtune.run.curator_log import read_curator

    text = (out / "rounds.jsonl").read_text() + (out / "summary.json").read_text()
    assert '"partition_id"' not in text and '"delta_norm"' not in text
    assert "aggregated_delta_norms\": [" not in text
    lines = read_curator(out)
    # One line per round, and the run's own: its length (summary.json's wall_s is null).
    curator = [c for c in lines if "run" not in c]
    assert [c["round"] for c in curator] == [r["round"] for r in rounds]
    [run_line] = [c for c in lines if "run" in c]
    assert run_line["run"]["wall_s"] > 0 and summary["wall_s"] is None
    assert sorted(c["partition_id"] for c in curator[0]["per_client"]) == [0, 1, 2]
    assert curator[0]["privacy_user"]["aggregated_delta_norms"]
    # The cohort's size, sums and unnoised loss: null in the release, kept for the curator.
    from fedtune.cli import round_line
    from fedtune.run.curator_log import COHORT_FIGURES

    assert all(r[k] is None for r in rounds for k in COHORT_FIGURES)
    assert curator[0]["clients"] == curator[0]["sampled"] == 3 and curator[0]["bytes_up"] > 0
    assert summary["total_bytes_up"] is summary["total_client_flops"] is None
    assert "clients" not in round_line(rounds[0], cfg)


def test_log_cohorts_keeps_them_in_the_rounds_file(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY, *USER, "privacy.user.log_cohorts=true"])
    inline_run(cfg, tmp_path / "run", monkeypatch)
    rounds = _rounds(tmp_path / "run")
    assert sorted(c["partition_id"] for c in rounds[0]["per_client"]) == [0, 1, 2]
    assert not (tmp_path / "run" / "curator_log.jsonl").exists()
    from fedtune.cli import round_line

    assert rounds[0]["clients"] == 3 and rounds[0]["bytes_up"] > 0
    assert "clients 3" in round_line(rounds[0], cfg)


def test_under_dp_every_example_field_is_protected_or_withheld():
    """The table itself: under sample-level DP without the opt-in, nothing about individual
    examples or the Poisson draw is sent in clear, in any combination of settings, but for
    the exact count a node with its own data file sends at discovery (listed, with that
    condition, as in clear: tests/test_discovery.py)."""
    from fedtune.wire.fields import examples_in_clear, withheld_fields

    plugins = ["data.domain_by=collection", "data.target_domain=set2",
               "data.target_clients=2",
               'plugins=[{name = "population_expansion", weighting = "fixed", lam = 0.5}]']
    for sets in ([], SMASHED, ["train.local_epochs=1"], plugins,
                 ["privacy.user.enabled=true"]):
        cfg = load_config(None, sets)
        assert [f.item for f in examples_in_clear(cfg)] == ["own-data example count"], sets
        assert all(f.only_when for f in examples_in_clear(cfg)), sets
        assert "num_examples" in withheld_fields(cfg) and "loss" in withheld_fields(cfg)
    disclosed = load_config(None, [*SMASHED, "privacy.disclose_counts=true"])
    assert {f.item for f in examples_in_clear(disclosed)} >= {"num_examples", "loss",
                                                               "split figures"}


def test_the_documented_statement_is_the_generated_one():
    from pathlib import Path

    from fedtune.wire.fields import readme_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "wire.md").read_text()
    assert readme_table() in page, "run `python -m fedtune.wire.fields` and paste it"
