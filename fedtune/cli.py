"""`fedtune` command line."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedtune.audit.cli import audit_app
from fedtune.config import ConfigError, ExperimentConfig, load_config
from fedtune.deploy.cli import deploy_app
from fedtune.run.curator_log import keeps_cohorts_apart
from fedtune.run.folder import CONFIG_FILE, RUN_LOG, RunFolderError, claim_run_folder
from fedtune.run.preflight import preflight
from fedtune.runtime.interrupt import (
    EXIT_CODE,
    RunInterrupted,
    end_children,
    on_stop,
    received,
    stop_on_signals,
)
from fedtune.runtime.quiet import route_to_log, unroute
from fedtune.runtime.startup import launch_time

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated, differentially private fine-tuning of transformers.")
app.add_typer(deploy_app, name="deploy")
app.add_typer(audit_app, name="audit")
console = Console()

# Errors a user can fix from their config or data: one red line, no traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from fedtune.data import CorpusError, PartitionError
    from fedtune.data.predict_input import PredictInputError
    from fedtune.models import BackboneError
    from fedtune.run.checkpoint import CheckpointError
    from fedtune.run.export import ExportError
    from fedtune.run.ledger import LedgerError, NoContributionError
    from fedtune.runtime.local_ray import RayNotLoopbackError
    from fedtune.runtime.worker_death import WorkerDiedError
    from fedtune.wire.delta import DeltaError

    return _USER_ERRORS + (BackboneError, CheckpointError, CorpusError, DeltaError, ExportError,
                           LedgerError, NoContributionError, PartitionError, PredictInputError,
                           RayNotLoopbackError, WorkerDiedError)


@app.callback()
def _root() -> None:
    """fedtune: simulate and run federated DP fine-tuning (see README.md)."""


def _with_app_checks() -> None:
    """Load the app layer's config checks (plugin names and params) before a config is
    validated: this CLI assembles the app, the library's config module never imports it."""
    import strategies.plugins  # noqa: F401  (registers its check with fedtune.config.registry)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(
        help="Experiment TOML. Omitted: the built-in quickstart "
             "(same as experiments/quickstart.toml).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key, e.g. --set train.rounds=3 (repeatable).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Run folder (default: runs/<name>-<timestamp>).")] = None,
    ray_address: Annotated[str | None, typer.Option(
        help="Run on an existing Ray cluster at this address.")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the interrupted run in this folder from its last checkpoint.")] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Simulate an experiment and write its run folder."""
    overrides = list(set_ or [])
    if ray_address:
        overrides.append(f"simulation.ray_address={ray_address}")
    if resume is not None:
        if config is not None or set_ or out is not None:
            _fail("--resume continues a run with its own config.toml; it takes no config, "
                  "--set or --out")
        config, out = resume / CONFIG_FILE, resume
        if not config.is_file():
            _fail(f"{resume} holds no {CONFIG_FILE}: not a run folder")
    _with_app_checks()
    try:
        cfg = load_config(config, overrides)
        preflight(cfg, config)  # before the run folder, Ray or the model
    except _USER_ERRORS as exc:  # first: `_user_errors()` imports torch (seconds)
        _fail(str(exc))
    except _user_errors() as exc:
        _fail(str(exc))
    out = out or Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    with stop_on_signals():
        try:
            # Before Ray or the model start: a bad --out fails at once, and the lock keeps
            # any other run out of the folder until this process ends.
            folder = claim_run_folder(out, resume=resume is not None,
                                      flag="--resume" if resume is not None else "--out")
        except RunFolderError as exc:
            _fail(str(exc))
        try:
            if not verbose:  # dependencies' warnings and notices: to the run's log file
                route_to_log(out / RUN_LOG)
            with on_stop(lambda: _stopped(out)):
                summary = _run_with_progress(cfg, out, verbose, resume is not None)
        except RunInterrupted:
            _stopped(out)
        finally:
            unroute()
            folder.release()
    _print_summary(summary, out, cfg)


def _stopped(out: Path) -> None:
    """After the run's own stop callbacks (Ray's processes ended, temp folder removed): one
    line, then exit at once. The ServerApp's thread, still waiting for replies that will not
    come, must not hold the process until its round timeout."""
    import os

    from fedtune.run.folder import CHECKPOINT_FILE, SUMMARY_FILE

    # The ServerApp's thread may finish the last round while Ray is being stopped.
    if (out / SUMMARY_FILE).exists():
        where = f"the run had already finished: {out / SUMMARY_FILE}"
    elif (out / CHECKPOINT_FILE).exists():
        where = f"{out} is resumable: fedtune run --resume {out}"
    else:  # the first checkpoint is written before anything is charged or sent
        where = f"it stopped before round 1, nothing to resume (remove {out} to start again)"
    end_children()  # a Ray interrupted while it was starting may have left some
    console.print(f"[bold yellow]stopped[/] by {received()}: {where}", highlight=False,
                  soft_wrap=True)
    console.file.flush()
    os._exit(EXIT_CODE)


def _run_with_progress(cfg: ExperimentConfig, out: Path, verbose: bool, resume: bool
                       ) -> dict[str, Any]:
    from fedtune.runtime.startup import StartupReport, reporting
    from fedtune.sim.driver import prepare_resume, run_experiment

    dp, user = cfg.privacy.sample, cfg.privacy.user
    dp_txt = f"eps<={dp.target_epsilon}" if dp.enabled else "off"
    if user.enabled:
        dp_txt += f", user-level DP eps<={user.target_epsilon} ({user.clipping} clipping)"
    console.print(f"[bold]fedtune[/] {cfg.name}: {cfg.tuning.method} on {cfg.model.backbone}, "
                  f"{cfg.data.num_clients} clients ({cfg.data.partition}), "
                  f"{cfg.train.clients_per_round}/round, {cfg.train.rounds} rounds, "
                  f"DP-SGD {dp_txt} -> {out}")
    # Under user-level DP (cohorts kept apart) a round's duration follows its secret cohort,
    # so the run's elapsed time is the curator's (summary.json's wall_s is null): not shown.
    elapsed = [] if keeps_cohorts_apart(cfg) else [TimeElapsedColumn()]
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} rounds"), *elapsed,
                        console=console, transient=False)
    done = 0
    # One line per start-up phase (imports, Ray, model, data, workers, ...), printed as it
    # ends: with a large backbone the start is otherwise minutes of silence.
    startup = StartupReport(lambda line: progress.console.print(line, highlight=False,
                                                                soft_wrap=True),
                            launched=launch_time())
    if resume:
        # Imported here: fedtune.task.task imports torch and transformers, which a fresh run
        # imports in a thread while Ray starts (fedtune.sim.driver.run_experiment).
        from fedtune.run.checkpoint import load_checkpoint, privacy_fingerprint
        from fedtune.task.task import get_task

        try:
            with reporting(startup):
                spec_hash = get_task(cfg).spec.hash
                done = prepare_resume(out, spec_hash)
                # Here, before Ray or any actor starts (the server checks it again): a
                # config that changes what a privacy mechanism reads is refused.
                load_checkpoint(out, spec_hash, privacy_fingerprint(cfg))
        except _user_errors() as exc:
            _fail(str(exc))
        console.print(f"resuming after round {done} of {cfg.train.rounds}")
    task_id = progress.add_task("starting (data, model, workers)", total=cfg.train.rounds,
                                completed=done)

    def on_round(rec: dict[str, Any]) -> None:
        progress.console.print(round_line(rec, cfg), highlight=False, markup=False)
        progress.update(task_id, advance=1, description=f"round {rec['round']}")

    try:
        with progress, reporting(startup):
            return run_experiment(cfg, out, on_round=on_round, verbose=verbose, resume=resume)
    except _user_errors() as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


def round_line(rec: dict[str, Any], cfg: ExperimentConfig) -> str:
    """The console's line for one round; each epsilon with its marks."""
    from fedtune.run.epsilon_marks import epsilon_marks, render_epsilon

    eps = render_epsilon(rec["epsilon_sample"],
                         epsilon_marks(cfg, "sample", rec["epsilon_sample"]))
    if rec["epsilon_user"] is not None:
        user = render_epsilon(rec["epsilon_user"],
                              epsilon_marks(cfg, "user", rec["epsilon_user"]))
        eps = f"{eps} (user {user})"
    val = _validation_text(rec, cfg)
    # Null under user-level DP without log_cohorts: the secret cohort's size and sums.
    cohort = ("" if rec["clients"] is None else
              f"clients {rec['clients']}  up {rec['bytes_up']:,} B  ")
    wall = "" if rec["wall_s"] is None else f"{rec['wall_s']:.1f} s"  # null: as above
    return f"round {rec['round']:>3}: {val}  eps {eps}  {cohort}{wall}"


def _validation_text(rec: dict[str, Any], cfg: ExperimentConfig) -> str:
    """A round's validation figures; a language model's null perplexity where a split was
    evaluated is a diverged model or no predicted token (the run's log says which), not a
    missing split."""
    loss = rec["val_loss"]
    if cfg.task.kind != "causal_lm":
        if rec.get("val_accuracy") is None:
            return "no validation split"
        return (f"val acc {rec['val_accuracy']:.4f}  " +
                ("val loss null (diverged, see run.log)" if loss is None
                 else f"val loss {loss:.4f}"))
    ppl = rec.get("val_perplexity")
    if ppl is not None:
        return f"val ppl {ppl:.2f}  val loss {loss:.4f}"
    if loss is None:  # a split is carved whenever the fraction is above 0
        return ("no validation split" if cfg.data.validation_fraction <= 0 else
                "val ppl null (no finite loss, see run.log)")
    return f"val ppl null (diverged, see run.log)  val loss {loss:.4f}"


def summary_line(summary: dict[str, Any], out: Path, cfg: ExperimentConfig) -> str:
    """The console's final line; each epsilon with its marks."""
    from rich.markup import escape

    from fedtune.run.epsilon_marks import epsilon_marks, render_epsilon
    from fedtune.split.disclosure import dp_level_label

    eps = {level: escape(render_epsilon(summary.get(f"epsilon_{level}"),
                                 epsilon_marks(cfg, level, summary.get(f"epsilon_{level}")),
                                 digits=3, off="null"))
           for level in ("sample", "user")}
    label = dp_level_label(cfg)  # a split run: what its epsilon covers, as the report says
    if label is not None and summary.get("epsilon_sample") is not None:
        eps["sample"] += f" ({label.removeprefix('sample-level DP on ')})"
    # null under user-level DP: the run's length sums the secret cohorts' rounds.
    took = "" if summary["wall_s"] is None else f" in {summary['wall_s']:.0f} s"
    return (
        f"[bold green]done[/]{took}: {quality_text(summary)}"
        f"epsilon_sample {eps['sample']}, epsilon_user {eps['user']}, "
        + ("" if summary["total_bytes_up"] is None else f"{summary['total_bytes_up']:,} B up, ")
        + _smashed_text(summary, cfg)
        + f"{summary['trainable_params']:,} trainable params"
        f" -> {out}/summary.json")


def quality_text(summary: dict[str, Any]) -> str:
    """The final model's quality against its baselines, and the validation figures: test
    accuracy for a classifier, test perplexity (untuned -> final) for a language model."""
    # A classifier's summary always holds a test accuracy; a language model's never does,
    # and its perplexities are null where no test text held a token to predict.
    if summary.get("final_accuracy") is None:
        best = summary.get("best_val_perplexity")
        val = "" if best is None else (
            f"validation perplexity {_ppl(summary.get('final_val_perplexity'))} (best "
            f"{best:.2f} at round {summary['best_round']}), ")
        rouge = "" if summary.get("test_rouge_l") is None else (
            f"continuation ROUGE-L {_ppl(summary.get('initial_test_rouge_l'), 3)} untuned -> "
            f"{summary['test_rouge_l']:.3f}, ")
        return (f"test perplexity {_ppl(summary.get('initial_test_perplexity'))} untuned -> "
                f"{_ppl(summary.get('test_perplexity'))}, {rouge}{val}")
    best = summary.get("best_val_accuracy")
    val = "" if best is None else (
        f"validation {summary['final_val_accuracy']:.4f} (best {best:.4f} at round "
        f"{summary['best_round']}), ")
    return (f"final test accuracy {summary['final_accuracy']:.4f} "
            f"({baseline_text(summary)}), {val}")


def _ppl(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _smashed_text(summary: dict[str, Any], cfg: ExperimentConfig) -> str:
    """A split run's smashed data, and whether it went up in clear (as its summary says)."""
    from fedtune.split.disclosure import protects_smashed_data

    smashed = summary.get("total_smashed_bytes_up")
    if smashed is None:
        return ""
    return (f"{smashed:,} B smashed data up"
            + ("" if protects_smashed_data(cfg) else " in clear") + ", ")


def baseline_text(summary: dict[str, Any]) -> str:
    """The final test accuracy's baselines: the majority class (what always answering the
    most frequent training label scores on the same rows) and the untrained model. A run
    that does not beat the majority class says so: it learned nothing a guess would not."""
    untrained = f"untrained {summary['initial_accuracy']:.4f}"
    majority = summary.get("majority_accuracy")
    if majority is None:  # a summary written before the baseline existed
        return untrained
    if summary["final_accuracy"] <= majority:
        return (f"[bold yellow]did not beat the majority class ({majority:.4f})[/], "
                f"{untrained}")
    return f"majority class {majority:.4f}, {untrained}"


def _print_summary(summary: dict[str, Any], out: Path, cfg: ExperimentConfig) -> None:
    stopped = summary.get("stopped_early")
    if stopped:
        console.print(f"[bold yellow]stopped before round {stopped['before_round']}:[/] "
                      f"{stopped['reason']}", highlight=False)
    console.print(summary_line(summary, out, cfg), highlight=False)


@app.command()
def sweep(
    file: Annotated[Path, typer.Argument(help="Sweep TOML: a base experiment and [[run]]s.")],
    out: Annotated[Path | None, typer.Option(
        help="Folder for the runs (default: runs/<sweep name>).")] = None,
    parallel: Annotated[int, typer.Option(
        help="Runs at a time; the machine's cores are split between them.")] = 1,
) -> None:
    """Run every variant of a sweep (finished ones are reused, interrupted ones resumed)."""

    from rich.table import Table

    from fedtune.run.atomic import write_json_atomic
    from fedtune.run.folder import SWEEP_RESULTS
    from fedtune.study.selection import rank_by_validation, selection_axis
    from fedtune.study.sweep import load_sweep, run_sweep

    _with_app_checks()

    try:
        spec = load_sweep(file)
        for variant in spec.variants:  # every variant's files, before the first one starts
            try:
                preflight(load_config(spec.base, list(variant.overrides)), spec.base)
            except ConfigError as exc:
                raise ConfigError(f"{file}: run {variant.name!r}: {exc}") from None
    except _USER_ERRORS as exc:  # first: `_user_errors()` imports torch (seconds)
        _fail(str(exc))
    except _user_errors() as exc:
        _fail(str(exc))
    out = out or Path("runs") / spec.name
    if out.is_symlink():  # as `fedtune run --out`: a sweep never writes through a link
        _fail(f"--out {out} is a symlink; give the real folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _SweepProgress(spec, out) as monitor:
            rows = run_sweep(spec, out, parallel=parallel, monitor=monitor)
    except (RuntimeError, ConfigError) as exc:
        _fail(str(exc))
    # Never through a link planted as sweep.json: replaced, not followed.
    write_json_atomic(out / SWEEP_RESULTS, rows)
    # The task kind's figures (a classifier's accuracy, a language model's perplexity).
    axis = selection_axis(spec.variants)

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.{axis.digits}f}"

    table = Table(title=f"{spec.name} ({out})")
    for column in ("run", "method", "epsilon_sample", "epsilon_user", "rounds",
                   f"val {axis.title}", f"test {axis.title}"):
        # Run names carry the grid values: fold them rather than cut them off.
        table.add_column(column, justify="left" if column in ("run", "method") else "right",
                         overflow="fold" if column == "run" else "ellipsis")
    try:  # each epsilon marked from its folder's config (sweep.json is written already)
        for row in rows:
            table.add_row(row["name"], row["method"], *sweep_epsilons(row),
                          str(row["rounds"]), shown(row.get(axis.final_val_key)),
                          shown(row.get(axis.final_key)))
    except ConfigError as exc:
        _fail(f"the results are in {out / SWEEP_RESULTS}, but the table cannot be made: {exc}")
    console.print(table)
    ranked = rank_by_validation(spec.variants, rows)
    if len(ranked) > 1:
        # Chosen on the validation split; the test column is there to report, not to pick.
        order = "lowest" if axis.lower_is_better else "highest"
        ranking = Table(title=f"settings by validation {axis.title} of the final model "
                              f"({order} first, mean over seeds; test {axis.title} "
                              "reported only)")
        for column in ("settings", "runs", f"val {axis.title}", f"test {axis.title}"):
            ranking.add_column(column, justify="left" if column == "settings" else "right",
                               overflow="fold")
        for c in ranked:
            ranking.add_row(c.label, str(len(c.runs)), shown(c.val_score), shown(c.test_score))
        console.print(ranking)
        console.print(f"best on validation: {ranked[0].label}", highlight=False)


class _SweepProgress:
    """One progress view for a sweep: runs done overall, and rounds of each active run."""

    def __init__(self, spec: Any, out: Path) -> None:
        from fedtune.run.folder import SUMMARY_FILE

        self.rounds = {v.name: load_config(spec.base, list(v.overrides)).train.rounds
                       for v in spec.variants}
        done = sum((out / v.name / SUMMARY_FILE).exists() for v in spec.variants)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), console=console)
        self.overall = self.progress.add_task(f"[bold]{spec.name}[/] runs",
                                              total=len(spec.variants), completed=done)
        self.active: dict[str, Any] = {}

    def __enter__(self) -> _SweepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def started(self, variant: Any, folder: Path) -> None:
        self.active[variant.name] = self.progress.add_task(
            f"  {variant.name} rounds", total=self.rounds[variant.name])

    def progressed(self, variant: Any, rounds_done: int) -> None:
        self.progress.update(self.active[variant.name], completed=rounds_done)

    def finished(self, variant: Any, ok: bool) -> None:
        self.progress.remove_task(self.active.pop(variant.name))
        self.progress.advance(self.overall)
        mark = "[green]done[/]" if ok else "[red]failed[/]"
        self.progress.console.print(f"{mark} {variant.name}")


@app.command()
def report(
    dirs: Annotated[list[Path], typer.Argument(help="Run folders or folders of runs.")],
    out: Annotated[Path | None, typer.Option(
        help="Where to write report.md and the PNGs (default: FIRST_DIR/report).")] = None,
    title: Annotated[str, typer.Option(help="Heading of report.md.")] = "fedtune report",
) -> None:
    """Markdown table and plots (accuracy, or a language model's perplexity, vs epsilon, vs
    round, vs uploaded bytes)."""
    from fedtune.study.report import ReportError, collect, group, markdown_table, write_report

    try:
        groups = group(collect(dirs))
    except (*_user_errors(), ReportError) as exc:
        _fail(str(exc))
    try:  # the output folder is claimed as a run's --out is (no link, no run's files)
        written = write_report(groups, out or dirs[0] / "report", title)
    except RunFolderError as exc:
        _fail(str(exc))
    print(markdown_table(groups))
    console.print(f"[bold green]wrote[/] {', '.join(str(p) for p in written)}")


def sweep_epsilons(row: dict[str, Any]) -> tuple[str, str]:
    """A sweep row's two epsilons, marked from its run folder's config."""
    from fedtune.run.epsilon_marks import folder_marks, render_epsilon

    return tuple(render_epsilon(row.get(f"epsilon_{level}"),  # type: ignore[return-value]
                                folder_marks(row["folder"], level,
                                             row.get(f"epsilon_{level}")))
                 for level in ("sample", "user"))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    out: Annotated[Path, typer.Argument(help="New folder for the exported model.")],
) -> None:
    """Write a run's tuned model as a self-contained folder (docs/export.md)."""
    from fedtune.run.export import export_run

    try:
        folder = export_run(run_dir, out)
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"[bold green]exported[/] {run_dir} -> {folder} "
                  f"({', '.join(sorted(p.name for p in folder.iterdir()))})")


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="A run folder or a `fedtune export` folder.")],
    text: Annotated[list[str] | None, typer.Option(
        "--text", help="A text to classify (repeatable; a classifier).")] = None,
    prompt: Annotated[list[str] | None, typer.Option(
        "--prompt", help="A prompt to continue (repeatable; a language model).")] = None,
    file: Annotated[Path | None, typer.Option(
        help="Texts to classify or prompts to continue: .csv or .tsv with a header row, or "
             ".jsonl lines, with a text column (the run's text_field, or text) and, for a "
             "classifier, optionally a label column (then accuracy is reported); or .txt, "
             "one text per line.")
    ] = None,
    out: Annotated[Path | None, typer.Option(
        help="Write one JSON line per text here (label and probabilities; or prompt and "
             "generation).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Texts per forward pass (default: the run's train.eval_batch_size).")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        help="A language model's new tokens per prompt, at most (greedy; stops at its "
             "end-of-sequence token).")] = 32,
) -> None:
    """Classify texts with a tuned classifier, or continue prompts with a tuned language
    model (greedy)."""
    from fedtune.data.predict_input import PredictInputError, check_predict_options
    from fedtune.run.export import load_tuned

    if not text and not prompt and file is None:
        _fail("give texts with --text (a classifier), prompts with --prompt (a language "
              "model), or a --file")
    try:
        check_predict_options(batch_size, out)
        tuned = load_tuned(model_dir)
        kind = tuned.cfg.task.kind
        flags = {"--text": text, "--prompt": prompt}
        own = _PREDICTORS[kind][0]
        stray = [flag for flag, given in flags.items() if given and flag != own]
        if stray:
            raise PredictInputError(f"{model_dir} is a task.kind={kind!r} model: give its "
                                    f"inputs with {own}, not {stray[0]}")
        texts: list[str] = list(flags[own] or [])
    except _user_errors() as exc:
        _fail(str(exc))
    _PREDICTORS[kind][1](tuned, texts, file, out, batch_size, max_new_tokens)


def _predict_classes(tuned: Any, texts: list[str], file: Path | None, out: Path | None,
                     batch_size: int | None, max_new_tokens: int) -> None:
    """A classifier's labels (and the accuracy line for a labelled file)."""
    import json

    from fedtune.data.predict_input import input_columns, read_texts

    labels: list[int | None] | None = None
    try:
        if file is not None:
            file_texts, file_labels = read_texts(file, tuned.label_names,
                                                 input_columns(tuned.cfg))
            if file_labels is not None:
                labels = [None] * len(texts) + list(file_labels)
            texts += file_texts
    except _user_errors() as exc:
        _fail(str(exc))
    progress = Progress(TextColumn("classifying"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} texts"), TimeElapsedColumn(),
                        console=console, transient=True, disable=len(texts) < 256)
    with progress:
        bar = progress.add_task("", total=len(texts))
        probs = tuned.predict_proba(texts, batch_size,
                                    on_batch=lambda n: progress.advance(bar, n))
    predicted = probs.argmax(axis=1)
    if out is not None:
        from fedtune.run.atomic import write_text_atomic

        write_text_atomic(out, "".join(json.dumps({
            "label": tuned.label_names[predicted[i]],
            "probs": dict(zip(tuned.label_names, map(float, row), strict=True))}) + "\n"
            for i, row in enumerate(probs)))
    if file is None or out is None:
        for i, t in enumerate(texts):
            snippet = " ".join(t.split())[:70]
            print(f"{tuned.label_names[predicted[i]]}\t{probs[i, predicted[i]]:.3f}\t{snippet}")
    if labels is not None:
        scored = [(int(p), y) for p, y in zip(predicted, labels, strict=True) if y is not None]
        correct = sum(p == y for p, y in scored)
        console.print(f"accuracy {correct / len(scored):.4f} on {len(scored)} labelled rows "
                      f"({correct} right)")


def _predict_generations(tuned: Any, prompts: list[str], file: Path | None, out: Path | None,
                         batch_size: int | None, max_new_tokens: int) -> None:
    """A language model's greedy continuation of each prompt: `PROMPT<TAB>GENERATION` per
    line (whitespace collapsed), the exact texts as JSON lines in --out."""
    import json

    from fedtune.data.predict_input import input_columns, read_texts

    try:
        if file is not None:
            # Only the text column: a label column means nothing to a language model.
            prompts += read_texts(file, (), (input_columns(tuned.cfg)[0], ()))[0]
        # In token positions, not prompts: without a KV cache one long generation is most of
        # the work, and the time left is what a user needs to decide whether to wait.
        progress = Progress(TextColumn("generating"), BarColumn(),
                            TextColumn("{task.completed:,.0f}/{task.total:,.0f} token positions"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                            transient=True)
        with progress:
            bar = progress.add_task("", total=1)  # the real total comes with the first report
            generations = tuned.generate(
                prompts, max_new_tokens, batch_size,
                on_progress=lambda done, total: progress.update(bar, completed=done,
                                                                total=total))
    except _user_errors() as exc:
        _fail(str(exc))
    if out is not None:
        from fedtune.run.atomic import write_text_atomic

        write_text_atomic(out, "".join(json.dumps({"prompt": p, "generation": g}) + "\n"
                                       for p, g in zip(prompts, generations, strict=True)))
    if file is None or out is None:
        for p, g in zip(prompts, generations, strict=True):
            print(f"{' '.join(p.split())[:70]}\t{' '.join(g.split())}")


# Task kind -> (the flag of its inputs, what `fedtune predict` prints for its models).
_PREDICTORS = {"classification": ("--text", _predict_classes),
               "causal_lm": ("--prompt", _predict_generations)}


def _fail(message: str) -> None:
    # soft_wrap: one line whatever the terminal's width, so it can be read and grepped whole.
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
