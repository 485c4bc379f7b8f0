"""`fedtune report` on a fixture of run folders: grouping, the table, readable plots."""

import json
import math

import matplotlib.image
import pytest

from fedtune.config import load_config
from fedtune.split.disclosure import DELTAS_ONLY, WITH_SMASHED
from fedtune.study.report import _lines, collect, group, markdown_table, write_report


def _run(folder, method, eps, seed, acc, extra=(), smashed=0):
    sets = [f"tuning.method={method}", f"seed={seed}", *extra]
    sets += ["privacy.sample.enabled=false"] if eps is None else [
        f"privacy.sample.target_epsilon={eps}"]
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(load_config(None, sets).to_toml())
    rounds = [{"round": r, "val_accuracy": acc - 0.1 / r, "bytes_up": 1000 * r,
               **({"smashed_bytes_up": smashed} if smashed else {})} for r in (1, 2)]
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (folder / "summary.json").write_text(json.dumps({
        "final_accuracy": acc, "epsilon_sample": None if eps is None else eps * 0.8,
        "epsilon_user": None}))


@pytest.fixture
def runs(tmp_path):
    for method in ("prompt", "lora"):
        for eps, base in ((1, 0.80), (8, 0.90), (None, 0.95)):
            for seed in (0, 1):
                _run(tmp_path / f"{method}-{eps}-{seed}", method, eps, seed,
                     base + 0.01 * seed)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.toml").write_text("")
    return tmp_path


def test_groups_average_over_seeds(runs):
    groups = group(collect([runs]))
    assert len(groups) == 6 and all(len(g.runs) == 2 for g in groups)
    lora8 = next(g for g in groups if g.method == "lora" and g.target_epsilon == 8)
    assert lora8.accuracy_mean == pytest.approx(0.905)
    assert lora8.accuracy_std == pytest.approx(0.01 / math.sqrt(2))
    table = markdown_table(groups)
    assert "| lora | sample | 8 | 6.40 | 0.9050 +- 0.0071 | 2 | 0.00 |" in table
    assert "| prompt | none | inf (no DP) | - | 0.9550 +- 0.0071 | 2 |" in table


def test_a_user_level_release_without_cohort_bytes_is_reported(tmp_path):
    """Under user-level DP without log_cohorts rounds.jsonl holds null bytes (a sum over the
    secret cohort): the report shows no upload figure instead of failing."""
    _run(tmp_path / "user", "prompt", None, 0, 0.9, ["privacy.user.enabled=true"])
    rounds = (tmp_path / "user" / "rounds.jsonl").read_text().replace('"bytes_up": 1000',
                                                                     '"bytes_up": null')
    (tmp_path / "user" / "rounds.jsonl").write_text(rounds)
    [run] = collect([tmp_path])
    assert run.cumulative_mb_up == []
    assert markdown_table(group([run])).splitlines()[-1].endswith("| 1 | - |")


def test_a_user_level_split_release_is_plotted_without_its_bytes(tmp_path):
    """`fedtune report` on user-level releases (a split one too, its smashed bytes null):
    the validation curves are drawn, the bytes plot leaves those runs out, nothing fails."""
    for name, extra in (("user", []), ("split", ["split.enabled=true"])):
        _run(tmp_path / "runs" / name, "prompt", None, 0, 0.9,
             ["privacy.user.enabled=true", *extra], smashed=5)
        path = tmp_path / "runs" / name / "rounds.jsonl"
        path.write_text(path.read_text().replace('"bytes_up": 1000', '"bytes_up": null')
                        .replace('"smashed_bytes_up": 5', '"smashed_bytes_up": null'))
    groups = group(collect([tmp_path / "runs"]))
    assert len(groups) == 2 and all(not r.cumulative_mb_up for g in groups for r in g.runs)
    written = write_report(groups, tmp_path / "report", "user")
    assert all(p.exists() and p.stat().st_size > 0 for p in written)


def test_runs_that_differ_beyond_the_seed_are_not_averaged(tmp_path):
    for seed in (0, 1):
        _run(tmp_path / f"small-{seed}", "prompt", 1, seed, 0.7)
        _run(tmp_path / f"big-{seed}", "prompt", 1, seed, 0.8, ["data.num_clients=40"])
    groups = group(collect([tmp_path]))
    assert sorted((g.variant, len(g.runs), g.accuracy_mean) for g in groups) == [
        ("data.num_clients=20", 2, pytest.approx(0.7)),
        ("data.num_clients=40", 2, pytest.approx(0.8))]
    assert "| prompt | data.num_clients=40 | sample | 1 |" in markdown_table(groups)


def test_a_split_run_is_its_own_line_and_its_smashed_upload_counts(tmp_path):
    split = ["split.enabled=true", "split.cut_layer=1", "split.local_loss_fraction=0.5"]
    for seed in (0, 1):
        _run(tmp_path / f"prompt-{seed}", "prompt", 1, seed, 0.7)
        _run(tmp_path / f"split-{seed}", "prompt", 1, seed, 0.8, split, smashed=10**6)
    groups = group(collect([tmp_path]))
    assert sorted((g.method, g.variant, len(g.runs)) for g in groups) == [
        ("prompt", "", 2), ("prompt split k=1 local-loss 0.5", "", 2)]
    split_group = next(g for g in groups if "split" in g.method)
    assert split_group.mean_curve("cumulative_mb_up") == pytest.approx([1.001, 2.003])


def test_report_writes_table_and_readable_plots(runs, tmp_path):
    written = write_report(group(collect([runs])), tmp_path / "report", "fixture")
    assert [p.name for p in written] == ["report.md", "accuracy_vs_epsilon.png",
                                         "accuracy_vs_round.png", "accuracy_vs_bytes.png"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.startswith("# fixture") and "![accuracy vs epsilon]" in text
    for png in written[1:]:
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.05


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished run folders"):
        collect([tmp_path])


def test_split_runs_are_labelled_by_what_their_epsilon_protects(tmp_path):
    """A split run with DP-SGD alone is not data-level DP (the server holds the smashed
    data): labelled so, marked in the table and kept off the epsilon axis; with smashed DP
    it is, at the smashed target."""
    split = ["split.enabled=true", "split.cut_layer=1"]
    for seed in (0, 1):
        _run(tmp_path / f"clear-{seed}", "prompt", 8, seed, 0.8, split, smashed=10)
        _run(tmp_path / f"noised-{seed}", "prompt", 8, seed, 0.6,
             [*split, "split.smashed_dp.enabled=true", "split.smashed_dp.target_epsilon=1"],
             smashed=10)
        _run(tmp_path / f"plain-{seed}", "prompt", 8, seed, 0.9)
    groups = group(collect([tmp_path]))
    levels = {g.level: g for g in groups}
    assert set(levels) == {"sample", DELTAS_ONLY, WITH_SMASHED}
    assert levels[WITH_SMASHED].target_epsilon == 1
    table = markdown_table(groups)
    assert f"| {DELTAS_ONLY} | 8 | 6.40 [data in clear] (deltas only) |" in table
    assert f"| {WITH_SMASHED} | 1 | 6.40 |" in table
    plotted = {level for (_, _, level) in _lines(groups)}
    assert DELTAS_ONLY not in plotted and WITH_SMASHED in plotted
    write_report(groups, tmp_path / "report", "split")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "not plotted against epsilon" in text and "sample-level DP\"" not in text


def test_seeded_and_split_in_clear_epsilons_are_marked_in_the_table_legend_and_plots(tmp_path):
    """26 #6: seeded-noise epsilons were unmarked in report.md."""
    _run(tmp_path / "seeded", "prompt", 8, 0, 0.8, ["privacy.reproducible_noise=true"])
    _run(tmp_path / "clear", "prompt", None, 0, 0.7, ["split.enabled=true"], smashed=10)
    _run(tmp_path / "secret", "prompt", 8, 1, 0.8)
    groups = group(collect([tmp_path]))
    table = markdown_table(groups)
    assert "| 6.40 [seeded noise] |" in table
    assert "| - [data in clear] |" in table  # DP off, split in clear: still labelled
    assert "| prompt | privacy.reproducible_noise=false | sample | 8 | 6.40 |" in table
    write_report(groups, tmp_path / "report", "marks")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "- [seeded noise] seeded noise: not a guarantee" in text
    assert "- [data in clear] data in clear:" in text
    from fedtune.study.report import _lines, _mark_tags
    labels = {_mark_tags(gs) for gs in _lines(groups).values()}
    assert " [seeded noise]" in labels


def test_a_privacy_levels_settings_name_no_variant_of_a_run_without_that_level(tmp_path):
    """A user-level run with its own clip beside sample-level runs (experiments/lm_prompt):
    the sample-level rows were labelled `privacy.user.clip_norm=5.0`, a setting they never
    use. A level's keys are a variant only among the runs that have that level on."""
    _run(tmp_path / "sample", "prompt", 8, 0, 0.9)
    _run(tmp_path / "none", "prompt", None, 0, 0.95)
    _run(tmp_path / "user", "prompt", None, 0, 0.8,
         ["privacy.user.enabled=true", "privacy.user.clip_norm=0.5"])
    _run(tmp_path / "user-wide", "prompt", None, 0, 0.7,
         ["privacy.user.enabled=true", "privacy.user.clip_norm=2.0"])
    labels = {g.runs[0].folder.name: g.variant for g in group(collect([tmp_path]))}
    assert labels["sample"] == labels["none"] == ""
    assert labels["user"] == "privacy.user.clip_norm=0.5"
    assert labels["user-wide"] == "privacy.user.clip_norm=2.0"
