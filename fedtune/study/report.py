"""`fedtune report`: a Markdown table and PNG plots from run folders.

Runs are grouped by (method, DP level, target epsilon, variant); seeds of a group give
the error bars. The variant names the other settings the runs differ in (for example
`data.num_clients=100`), so runs that differ in more than their seed are never averaged
together. The x position of a run without DP is "inf". Every number is read from the run
folders (summary.json, rounds.jsonl, config.toml), never recomputed.

A split run's DP level says what its epsilon protects: with DP-SGD alone the server still
holds every trained example's text and label (the smashed data goes up in clear), so such
a run is labelled "sample-level DP on deltas only; smashed data in clear" and kept off the
epsilon axis; with `split.smashed_dp` its epsilon covers the smashed data too.

What a run's quality is depends on its task kind (`QUALITY_AXES`): a classifier's final test
accuracy and validation accuracy per round, a language model's test perplexity and
validation perplexity per round (lower is better, drawn on a log axis; the PNGs are named
`perplexity_vs_*.png`). One report holds one kind: folders of both kinds are refused with
one line (their figures share no axis), to be reported separately.
"""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.config import ExperimentConfig, load_config
from fedtune.run.atomic import write_stream_atomic, write_text_atomic
from fedtune.run.epsilon_marks import LEVELS, MARKS, Mark, epsilon_marks, render_epsilon
from fedtune.run.folder import (
    CONFIG_FILE,
    LOCK_FILE,
    REPORT_FILE,
    ROUNDS_FILE,
    SUMMARY_FILE,
    claim_run_folder,
)
from fedtune.run.ledger import LedgerError, read_rounds
from fedtune.split.disclosure import DELTAS_ONLY, dp_level_label, protects_smashed_data


class ReportError(ValueError):
    """Run folders that cannot go into one report; the message says why."""


@dataclass(frozen=True)
class QualityAxis:
    """A task kind's quality figure, where the run folder holds it and how it is drawn."""

    name: str  # the PNGs' prefix
    final_key: str  # summary.json: the final model's test figure
    round_key: str  # rounds.jsonl: the validation figure of each round
    column: str  # the table's column
    final_label: str  # the epsilon plot's y axis
    round_label: str  # the per-round and per-byte plots' y axis
    title: str  # what the plot titles call it
    digits: int
    log_scale: bool  # perplexity spans orders of magnitude
    # The majority-class baseline exists (a classifier's), as its table column.
    has_majority: bool
    # summary.json: the final model's validation figure, what a sweep chooses settings on
    # (`fedtune.study.selection`), and which way is better.
    final_val_key: str = "final_val_accuracy"
    lower_is_better: bool = False

    @property
    def plots(self) -> tuple[str, str, str]:
        return tuple(f"{self.name}_vs_{x}.png"  # type: ignore[return-value]
                     for x in ("epsilon", "round", "bytes"))


# Task kind -> its quality axis (`[task] kind`; fedtune.task.kinds writes these fields).
QUALITY_AXES: dict[str, QualityAxis] = {
    "classification": QualityAxis(
        "accuracy", "final_accuracy", "val_accuracy", "final accuracy (mean +- std)",
        "final test accuracy (fraction)", "validation accuracy (fraction, mean over seeds)",
        "accuracy", 4, False, True),
    "causal_lm": QualityAxis(
        "perplexity", "test_perplexity", "val_perplexity",
        "final test perplexity (mean +- std)",
        "final test perplexity (log scale, lower is better)",
        "validation perplexity (log scale, mean over seeds)", "perplexity", 2, True, False,
        final_val_key="final_val_perplexity", lower_is_better=True),
}


@dataclass
class RunResult:
    folder: Path
    method: str
    # "none", "sample", "user", "sample+user", or a split run's label (see the docstring),
    # with "+user" when user-level DP is on too
    level: str
    target_epsilon: float  # inf without DP
    epsilon: float | None  # reported at the run's level (max of both when both are on)
    seed: int
    # The kind's final test figure (`QUALITY_AXES`): accuracy, or perplexity for an LM.
    accuracy: float
    # Its validation figure per round, None where a round's is null (a diverged LM round);
    # empty for a run without a validation split (and for folders written before it
    # existed, whose per-round figure was a test accuracy).
    accuracy_by_round: list[float | None]
    cumulative_mb_up: list[float]
    # Flattened config minus what the group key and the seed already say.
    settings: dict[str, str] = field(default_factory=dict)
    # What weakens the epsilon (fedtune.run.epsilon_marks), from the run's config.
    marks: tuple[Mark, ...] = ()
    # The majority class's test accuracy on the same rows (None: a folder written before
    # summary.json had it).
    majority: float | None = None
    kind: str = "classification"  # `[task] kind`


@dataclass
class Group:
    method: str
    level: str
    target_epsilon: float
    variant: str = ""
    runs: list[RunResult] = field(default_factory=list)

    @property
    def marks(self) -> list[Mark]:
        """Every mark any of its runs' epsilons carries, in registry order."""
        seen = {m for r in self.runs for m in r.marks}
        return [m for m in MARKS if m in seen]

    @property
    def accuracy_mean(self) -> float:
        return statistics.fmean(r.accuracy for r in self.runs)

    @property
    def accuracy_std(self) -> float:
        return statistics.stdev(r.accuracy for r in self.runs) if len(self.runs) > 1 else 0.0

    @property
    def majority_mean(self) -> float | None:
        """The runs' majority-class test accuracy (mean; None when a run lacks it)."""
        found = [r.majority for r in self.runs]
        if not found or any(m is None for m in found):
            return None
        return statistics.fmean(m for m in found if m is not None)

    def mean_curve(self, attr: str) -> list[float | None]:
        """The runs' mean per round; None at a round where a run's figure is null (a gap
        at that round: a mean over the other seeds would not be the group's)."""
        curves = [getattr(r, attr) for r in self.runs]
        n = min(len(c) for c in curves)
        return [None if any(c[i] is None for c in curves)
                else statistics.fmean(c[i] for c in curves) for i in range(n)]


def collect(dirs: list[Path]) -> list[RunResult]:
    """Every finished run folder under `dirs` (searched recursively)."""
    found = []
    for d in dirs:
        if not d.exists():
            raise FileNotFoundError(f"report input not found: {d}")
        for summary in sorted(d.rglob(SUMMARY_FILE)):
            folder = summary.parent
            if (folder / CONFIG_FILE).exists() and (folder / ROUNDS_FILE).exists():
                found.append(_load(folder))
    if not found:
        raise FileNotFoundError(f"no finished run folders (with {SUMMARY_FILE}) under "
                                f"{', '.join(map(str, dirs))}")
    return found


def _load(folder: Path) -> RunResult:
    cfg = load_config(folder / CONFIG_FILE)
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{folder / SUMMARY_FILE} is not JSON ({exc}); rerun or remove "
                          "that run folder") from None
    rounds = read_rounds(folder)
    axis = QUALITY_AXES[cfg.task.kind]
    if summary.get(axis.final_key) is None:
        raise LedgerError(f"{folder / SUMMARY_FILE} has no {axis.final_key} (a task.kind="
                          f"{cfg.task.kind!r} run's final figure; null where the model "
                          "diverged, see its run.log); rerun or remove that run folder")
    level, target = _level(cfg)
    eps = [e for e in (summary.get("epsilon_sample"), summary.get("epsilon_user"))
           if e is not None]
    up, total = [], 0
    for r in rounds:
        # Split mode also uploads smashed data every step: all of it counts as sent.
        sent = (r["bytes_up"], r.get("smashed_bytes_up", 0))
        if None in sent:  # user-level DP: cohort sums, kept for the curator (no curve)
            up = []
            break
        total += sum(sent)
        up.append(total / 1e6)
    marks = {m for lvl in LEVELS
             for m in epsilon_marks(cfg, lvl, summary.get(f"epsilon_{lvl}"))}
    return RunResult(folder, _method(cfg), level, target, max(eps) if eps else None,
                     cfg.seed, summary[axis.final_key], _round_figures(rounds, axis.round_key),
                     up, _settings(cfg), tuple(m for m in MARKS if m in marks),
                     summary.get("majority_accuracy"), cfg.task.kind)


def _round_figures(rounds: list[dict], key: str) -> list[float | None]:
    """Each round's validation figure, by position: None where it is null (a diverged
    round's perplexity), so the rounds after it keep their numbers (a gap in the curve);
    empty where no round has one (no validation split)."""
    figures = [r.get(key) for r in rounds]
    return figures if any(f is not None for f in figures) else []


def _method(cfg: ExperimentConfig) -> str:
    """The tuning method, and the split it runs under: a split run is its own line."""
    if not cfg.split.enabled:
        return cfg.tuning.method
    local = cfg.split.local_loss_fraction
    return (f"{cfg.tuning.method} split k={cfg.split.cut_layer}"
            + (f" local-loss {local:g}" if local > 0 else ""))


# Keys a group already shows (method, level, epsilon) or that differ between seeds by design.
_NOT_A_VARIANT = {"name", "seed", "tuning.method", "privacy.sample.enabled",
                  "privacy.user.enabled", "privacy.sample.target_epsilon",
                  "privacy.user.target_epsilon"}


def _settings(cfg: ExperimentConfig) -> dict[str, str]:
    flat: dict[str, str] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = json.dumps(node, sort_keys=True)

    resolved = cfg.to_dict()
    resolved["tuning"] = cfg.tuning.fingerprint()  # another method's table changes no result
    del resolved["runtime"]  # poll intervals and cache folder change no result either
    walk(resolved, "")
    # With smashed DP the target on the axis is the smashed one: DP-SGD's is a setting.
    shown = _NOT_A_VARIANT - ({"privacy.sample.target_epsilon"}
                              if protects_smashed_data(cfg) else set())
    # A privacy level that is off uses none of its settings: they label no variant.
    off = tuple(f"privacy.{level}." for level, on in (("sample", cfg.privacy.sample.enabled),
                                                      ("user", cfg.privacy.user.enabled))
                if not on)
    return {k: v for k, v in flat.items()
            if k not in shown and not k.startswith(("split.", *off))}  # split: in _method


def _variants(runs: list[RunResult]) -> dict[int, str]:
    """A short label per run: the settings in which the runs differ, `key=value, ...`."""
    keys = sorted({k for r in runs for k in r.settings})
    # A key only some runs show (smashed DP's DP-SGD target) varies among those runs only.
    differing = [k for k in keys
                 if len({r.settings[k] for r in runs if k in r.settings}) > 1]
    return {id(r): ", ".join(f"{k}={r.settings[k]}" for k in differing if k in r.settings)
            for r in runs}


def _level(cfg: ExperimentConfig) -> tuple[str, float]:
    sample, user = cfg.privacy.sample, cfg.privacy.user
    split_label = dp_level_label(cfg)
    if split_label is not None:
        target = (cfg.split.smashed_dp.target_epsilon if protects_smashed_data(cfg)
                  else sample.target_epsilon)
        if user.enabled:
            return f"{split_label} + user", min(target, user.target_epsilon)
        return split_label, target
    if sample.enabled and user.enabled:
        return "sample+user", min(sample.target_epsilon, user.target_epsilon)
    if sample.enabled:
        return "sample", sample.target_epsilon
    if user.enabled:
        return "user", user.target_epsilon
    return "none", math.inf


def run_kind(runs: list[RunResult]) -> str:
    """The one task kind of `runs`; runs of several kinds are a ReportError naming them."""
    kinds: dict[str, list[RunResult]] = {}
    for run in runs:
        kinds.setdefault(run.kind, []).append(run)
    if len(kinds) > 1:
        listed = "; ".join(f"{k}: {len(rs)} run{'s' * (len(rs) > 1)} (e.g. {rs[0].folder})"
                           for k, rs in sorted(kinds.items()))
        raise ReportError(f"the run folders mix task kinds ({listed}): accuracy and "
                          "perplexity share no axis; report each kind's folders separately")
    return next(iter(kinds), "classification")


def group(runs: list[RunResult]) -> list[Group]:
    """Runs grouped by method, DP level, target epsilon and variant (one task kind)."""
    run_kind(runs)
    variants = _variants(runs)
    groups: dict[tuple[str, str, float, str], Group] = {}
    for run in runs:
        key = (run.method, run.level, run.target_epsilon, variants[id(run)])
        groups.setdefault(key, Group(*key)).runs.append(run)
    return sorted(groups.values(),
                  key=lambda g: (g.method, g.variant, g.level, g.target_epsilon))


def _axis(groups: list[Group]) -> QualityAxis:
    return QUALITY_AXES[run_kind([r for g in groups for r in g.runs])]


def markdown_table(groups: list[Group]) -> str:
    axis = _axis(groups)
    with_variant = any(g.variant for g in groups)
    # Folders written before summary.json held the majority baseline have no such column.
    with_majority = axis.has_majority and any(g.majority_mean is not None for g in groups)
    head = "| method | " + ("variant | " if with_variant else "")
    lines = [head + f"DP level | target epsilon | reported epsilon (max) | {axis.column} | "
             "seeds | upload MB / run |"
             + (" majority class |" if with_majority else ""),
             "|---|" + ("---|" if with_variant else "") + "---|---:|---:|---:|---:|---:|"
             + ("---:|" if with_majority else "")]
    for g in groups:
        eps = [r.epsilon for r in g.runs if r.epsilon is not None]
        sent = [r.cumulative_mb_up[-1] for r in g.runs if r.cumulative_mb_up]
        mb = f"{statistics.fmean(sent):.2f}" if sent else "-"
        variant = f"{g.variant or '-'} | " if with_variant else ""
        shown = render_epsilon(max(eps) if eps else None, g.marks, off="-")
        if eps and _deltas_only(g.level):
            shown += " (deltas only)"
        lines.append(
            f"| {g.method} | {variant}{g.level} | {_fmt_eps(g.target_epsilon)} | "
            f"{shown} | {g.accuracy_mean:.{axis.digits}f} +- "
            f"{g.accuracy_std:.{axis.digits}f} | {len(g.runs)} | {mb} |"
            + (f" {_majority_cell(g)} |" if with_majority else ""))
    return "\n".join(lines)


def _majority_cell(g: Group) -> str:
    """The majority-class baseline; a final accuracy that does not beat it is flagged."""
    majority = g.majority_mean
    if majority is None:
        return "-"
    return f"{majority:.4f}" + (" (not beaten)" if g.accuracy_mean <= majority else "")


def _deltas_only(level: str) -> bool:
    """A level whose epsilon does not cover the data the server holds (split, in clear)."""
    return level.startswith(DELTAS_ONLY)


def _mark_tags(groups: list[Group]) -> str:
    """' [seeded noise]': the marks of a plotted line's epsilons (render_epsilon's tags)."""
    marks = [m for m in MARKS if any(m in g.marks for g in groups)]
    return render_epsilon(0.0, marks)[len(render_epsilon(0.0, [])):]


def _fmt_eps(eps: float) -> str:
    return "inf (no DP)" if math.isinf(eps) else f"{eps:g}"


def write_report(groups: list[Group], out: Path, title: str = "fedtune report",
                 flag: str = "--out") -> list[Path]:
    """Write `report.md` and the PNG plots into `out`; returns the files written. `out` is
    claimed as a run's `--out` is (a link there or inside it, a file, a run's folder or one
    in use is a RunFolderError naming it): its default sits in a run folder that may be
    shared, and a link planted as `report` was followed."""
    with claim_run_folder(out, flag=flag):
        try:
            return _write_report(groups, out, title)
        finally:
            (out / LOCK_FILE).unlink(missing_ok=True)  # the folder holds the report only


def _write_report(groups: list[Group], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.legend import Legend

    written = []
    axis = _axis(groups)
    for name, draw in zip(axis.plots, (_plot_epsilon, _plot_rounds, _plot_bytes), strict=True):
        curves = draw is not _plot_epsilon
        fig, ax = plt.subplots(figsize=(9.5, 4.8) if curves else (7, 4.5), dpi=120)
        draw(ax, groups)
        if axis.log_scale:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if not curves:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        legends = [a for a in ax.get_children() if isinstance(a, Legend)]
        # Tight bounds that take in the legends placed beside the axes.
        # Into the atomic writer's own file object: matplotlib never gets a name to open.
        write_stream_atomic(out / name, lambda fh, fig=fig, legends=legends: fig.savefig(
            fh, format="png", bbox_inches="tight", bbox_extra_artists=legends))
        plt.close(fig)
        written.append(out / name)
    body = [f"# {title}", "", markdown_table(groups), ""]
    if any(_deltas_only(g.level) for g in groups):
        body += [f"Runs labelled \"{DELTAS_ONLY}\" are split runs without "
                 "`split.smashed_dp`: their epsilon covers the uploaded deltas, but the "
                 "server receives every trained example's cut-layer activations and "
                 "body-output gradients in clear (text and labels are recoverable: "
                 "`fedtune audit split`). They are not plotted against epsilon.", ""]
    marks = [m for m in MARKS if any(m in g.marks for g in groups)]
    if marks:  # the legend of the marks beside the epsilons above and in the plots
        body += ["Marks beside an epsilon:", ""]
        body += [f"- [{m.tag}] {m.text}" for m in marks] + [""]
    body += [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in written]
    write_text_atomic(out / REPORT_FILE, "\n".join(body) + "\n")
    return [out / REPORT_FILE, *written]


def _lines(groups: list[Group]) -> dict[tuple[str, str, str], list[Group]]:
    """Groups of one method, variant and DP level, by epsilon; a no-DP group joins every
    line of its method and variant as the epsilon = inf point."""
    lines: dict[tuple[str, str, str], list[Group]] = {}
    for g in groups:
        if g.level != "none" and not _deltas_only(g.level):
            lines.setdefault((g.method, g.variant, g.level), []).append(g)
    for g in groups:
        if g.level == "none":
            keys = ([k for k in lines if k[:2] == (g.method, g.variant)]
                    or [(g.method, g.variant, "none")])
            for key in keys:
                lines.setdefault(key, []).append(g)
    return lines


def _plot_epsilon(ax, groups: list[Group]) -> None:
    finite = sorted({g.target_epsilon for g in groups if not math.isinf(g.target_epsilon)
                     and not _deltas_only(g.level)})
    inf_x = (max(finite) * 2.5) if finite else 1.0
    colors, _ = _curve_styles(groups)  # the same colour per method in every plot
    level_styles = {"sample": "-", "user": "--", "sample+user": "-.", "none": ":"}
    for (method, variant, level), gs in sorted(_lines(groups).items()):
        gs = sorted(gs, key=lambda g: g.target_epsilon)
        xs = [inf_x if math.isinf(g.target_epsilon) else g.target_epsilon for g in gs]
        label = (f"{method}, {_level_words(level)}{_mark_tags(gs)}"
                 + (f"\n{variant}" if variant else ""))
        ax.errorbar(xs, [g.accuracy_mean for g in gs], yerr=[g.accuracy_std for g in gs],
                    marker="o", capsize=3, label=label, color=colors[(method, variant)],
                    linestyle=level_styles.get(level, (0, (5, 1, 1, 1))))
    ax.set_xscale("log")
    ticks = [*finite, inf_x]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in finite] + ["inf\n(no DP)"])
    ax.minorticks_off()
    axis = _axis(groups)
    ax.set_xlabel("target epsilon (delta = 1e-5), log scale")
    ax.set_ylabel(axis.final_label)
    ax.set_title(f"{axis.title.capitalize()} vs privacy budget (error bars: std over seeds)")


def _curve_styles(groups: list[Group]) -> tuple[dict[tuple[str, str], str],
                                                dict[tuple[str, float], dict[str, object]]]:
    """Curves by round or bytes: one colour per method (and variant), one line style per
    DP level and epsilon, so 4 methods x 5 budgets stay readable with two short legends."""
    methods = sorted({(g.method, g.variant) for g in groups})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    budgets = sorted({(g.level, g.target_epsilon) for g in groups},
                     key=lambda b: (math.isinf(b[1]), b[0], b[1]))
    dashes = [":", "-.", "--", (0, (8, 2))]
    markers = [".", "x", "^", "s", "v"]
    styles: dict[tuple[str, float], dict[str, object]] = {}
    for i, budget in enumerate(budgets):
        if budget[0] == "none":
            styles[budget] = {"linestyle": "-", "marker": "o", "linewidth": 2.2}
        else:
            styles[budget] = {"linestyle": dashes[i % len(dashes)],
                              "marker": markers[i % len(markers)],
                              "linewidth": 1.4}
    return colors, styles


def _level_words(level: str) -> str:
    """'sample' -> 'sample-level DP', 'none' -> 'no DP'; a split label is already a phrase."""
    if level == "none":
        return "no DP"
    return level if "DP" in level else f"{level}-level DP"


def _budget_label(level: str, eps: float, marks: str = "") -> str:
    if level == "none":
        return "no DP"
    return textwrap.fill(f"{_level_words(level)}, eps {_fmt_eps(eps)}{marks}", 40)


def _plot_curves(ax, groups: list[Group], x_attr: str | None) -> None:
    from matplotlib.lines import Line2D

    colors, styles = _curve_styles(groups)
    for g in groups:
        # A null round is NaN: matplotlib leaves a gap there, the other rounds in place.
        y = [math.nan if v is None else v for v in g.mean_curve("accuracy_by_round")]
        if not y:  # no validation split: no per-round figure to draw
            continue
        x = list(range(1, len(y) + 1)) if x_attr is None else g.mean_curve(x_attr)[:len(y)]
        if not x:  # a user-level release: its bytes are the curator's, no curve to draw
            continue
        y = y[:len(x)]
        ax.plot(x, y, color=colors[(g.method, g.variant)], markersize=4,
                **styles[(g.level, g.target_epsilon)])
    method_handles = [Line2D([], [], color=c, linewidth=2.5,
                             label=textwrap.fill(m, 24) + (f"\n{v}" if v else ""))
                      for (m, v), c in colors.items()]
    budget_handles = [Line2D([], [], color="0.3", markersize=4, **st, label=_budget_label(
        *b, _mark_tags([g for g in groups if (g.level, g.target_epsilon) == b])))
                      for b, st in styles.items()]
    first = ax.legend(handles=method_handles, title="method", fontsize=7, title_fontsize=8,
                      loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    ax.legend(handles=budget_handles, title="privacy", fontsize=7, title_fontsize=8,
              loc="lower left", bbox_to_anchor=(1.01, 0.0))


def _plot_rounds(ax, groups: list[Group]) -> None:
    from matplotlib.ticker import MaxNLocator

    _plot_curves(ax, groups, None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis = _axis(groups)
    ax.set_xlabel("round")
    ax.set_ylabel(axis.round_label)
    ax.set_title(f"Validation {axis.title} vs round")


def _plot_bytes(ax, groups: list[Group]) -> None:
    _plot_curves(ax, groups, "cumulative_mb_up")
    ax.set_xscale("log")
    axis = _axis(groups)
    ax.set_xlabel("uploaded bytes, all clients so far (MB, log scale)")
    ax.set_ylabel(axis.round_label)
    ax.set_title(f"Validation {axis.title} vs uploaded bytes")
