"""`fedtune report` on causal-LM run folders: perplexity axes (validation perplexity per round,
test perplexity against epsilon) instead of accuracy, and folders of two task kinds refused
in one line."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fedtune.config import load_config  # noqa: E402
from fedtune.study.report import (  # noqa: E402
    ReportError,
    _plot_bytes,
    _plot_epsilon,
    _plot_rounds,
    collect,
    group,
    markdown_table,
    write_report,
)

LM = ["task.kind=causal_lm", "data.partition=iid"]


def _lm_run(folder, method, eps, seed, ppl, val=(400.0, 200.0)):
    sets = [*LM, f"tuning.method={method}", f"seed={seed}"]
    sets += ["privacy.sample.enabled=false"] if eps is None else [
        f"privacy.sample.target_epsilon={eps}"]
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(load_config(None, sets).to_toml())
    rounds = [{"round": r, "val_accuracy": None, "val_loss": math.log(v), "val_perplexity": v,
               "bytes_up": 1000 * r} for r, v in enumerate(val, start=1)]
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (folder / "summary.json").write_text(json.dumps({
        "final_accuracy": None, "majority_accuracy": None, "test_perplexity": ppl,
        "epsilon_sample": None if eps is None else eps * 0.8, "epsilon_user": None}))


@pytest.fixture
def lm_runs(tmp_path):
    for method in ("lora", "prompt"):
        for eps, base in ((1, 900.0), (8, 300.0), (None, 100.0)):
            for seed in (0, 1):
                _lm_run(tmp_path / f"{method}-{eps}-{seed}", method, eps, seed,
                        base * (2 if method == "prompt" else 1) + 10 * seed,
                        val=(base * 4 + seed, base * 2 + seed))
    return tmp_path


def test_lm_runs_are_grouped_and_tabled_by_test_perplexity(lm_runs):
    groups = group(collect([lm_runs]))
    assert len(groups) == 6 and all(r.kind == "causal_lm" for g in groups for r in g.runs)
    lora8 = next(g for g in groups if g.method == "lora" and g.target_epsilon == 8)
    assert lora8.accuracy_mean == pytest.approx(305.0)
    assert lora8.runs[0].accuracy_by_round in ([1200.0, 600.0], [1201.0, 601.0])
    table = markdown_table(groups)
    header = table.splitlines()[0]
    assert "final test perplexity (mean +- std)" in header and "accuracy" not in header
    assert "majority" not in header
    assert "| lora | sample | 8 | 6.40 | 305.00 +- 7.07 | 2 | 0.00 |" in table


def test_the_plots_have_perplexity_axes_and_data(lm_runs):
    groups = group(collect([lm_runs]))
    fig, ax = plt.subplots()
    _plot_epsilon(ax, groups)
    assert ax.get_ylabel() == "final test perplexity (log scale, lower is better)"
    assert ax.get_title().startswith("Perplexity vs privacy budget")
    # errorbar: the label is its container's, the data its first line's.
    lora = next(c.lines[0] for c in ax.containers
                if c.get_label().startswith("lora, sample-level DP"))
    # epsilon 1, 8 and the no-DP point (drawn at 2.5x the largest epsilon).
    assert list(lora.get_xdata()) == [1, 8, 20]
    assert list(lora.get_ydata()) == pytest.approx([905.0, 305.0, 105.0])
    plt.close(fig)
    for draw, xlabel in ((_plot_rounds, "round"), (_plot_bytes, "uploaded bytes")):
        fig, ax = plt.subplots()
        draw(ax, groups)
        assert ax.get_ylabel() == "validation perplexity (log scale, mean over seeds)"
        assert ax.get_xlabel().startswith(xlabel)
        assert ax.get_title().startswith("Validation perplexity vs")
        curves = sorted(list(line.get_ydata()) for line in ax.get_lines())
        assert [400.5, 200.5] in curves and [3600.5, 1800.5] in curves
        plt.close(fig)


def test_write_report_names_perplexity_plots_on_a_log_axis(lm_runs, tmp_path, monkeypatch):
    import matplotlib.figure

    scales = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        ax = fig.axes[0]
        scales.append((ax.get_ylabel(), ax.get_yscale()))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    written = write_report(group(collect([lm_runs])), tmp_path / "report")
    assert [p.name for p in written] == ["report.md", "perplexity_vs_epsilon.png",
                                         "perplexity_vs_round.png", "perplexity_vs_bytes.png"]
    assert all(p.stat().st_size > 0 for p in written)
    assert [s for _, s in scales] == ["log"] * 3
    assert all("perplexity" in label for label, _ in scales)
    assert "final test perplexity" in (tmp_path / "report" / "report.md").read_text()


def test_mixed_task_kinds_are_refused_in_one_line(lm_runs, cli):
    classifier = lm_runs / "classifier"
    classifier.mkdir()
    (classifier / "config.toml").write_text(load_config(None, []).to_toml())
    (classifier / "rounds.jsonl").write_text(json.dumps(
        {"round": 1, "val_accuracy": 0.9, "bytes_up": 10}) + "\n")
    (classifier / "summary.json").write_text(json.dumps({
        "final_accuracy": 0.9, "epsilon_sample": 1.0, "epsilon_user": None}))
    with pytest.raises(ReportError, match=r"mix task kinds \(causal_lm: 12 runs .*"
                       r"classification: 1 run"):
        group(collect([lm_runs]))
    result = cli("report", str(lm_runs), "--out", str(lm_runs / "out"))
    assert result.code == 2 and "report each kind's folders separately" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (lm_runs / "out").exists()


def test_an_lm_summary_without_its_perplexity_is_named(tmp_path):
    _lm_run(tmp_path / "run", "lora", 8, 0, 100.0)
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"final_accuracy": None}))
    from fedtune.run.ledger import LedgerError

    with pytest.raises(LedgerError, match="has no test_perplexity"):
        collect([tmp_path])


def test_a_round_with_a_null_perplexity_is_a_gap_at_its_round_not_a_shift(tmp_path):
    """A diverged round's validation perplexity is null (strict JSON); the curve keeps
    every other round at its own round number (a gap), in the per-run figures, the mean
    over seeds and both plots, never the rounds after it drawn one round early."""
    import numpy as np

    for seed in (0, 1):
        _lm_run(tmp_path / f"lora-{seed}", "lora", None, seed, 100.0 + seed,
                val=(400.0 + seed, 200.0 + seed, 150.0 + seed))
        lines = (tmp_path / f"lora-{seed}" / "rounds.jsonl").read_text().splitlines()
        middle = json.loads(lines[1]) | {"val_loss": None, "val_perplexity": None}
        lines[1] = json.dumps(middle)
        (tmp_path / f"lora-{seed}" / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    (only,) = group(collect([tmp_path]))
    assert only.runs[0].accuracy_by_round in ([400.0, None, 150.0], [401.0, None, 151.0])
    assert only.mean_curve("accuracy_by_round") == [400.5, None, 150.5]
    for draw in (_plot_rounds, _plot_bytes):
        fig, ax = plt.subplots()
        draw(ax, [only])
        (line,) = ax.get_lines()
        y = np.asarray(line.get_ydata(), dtype=float)
        x = np.asarray(line.get_xdata(), dtype=float)
        assert y[0] == 400.5 and np.isnan(y[1]) and y[2] == 150.5
        # Round 3's point is drawn at round 3 (or its upload, 6 kB), not at round 2's.
        assert list(x) == ([1, 2, 3] if draw is _plot_rounds else [0.001, 0.003, 0.006])
        plt.close(fig)
