"""The server's round loop: rounds of sample -> send global vector -> aggregate deltas ->
evaluate centrally on the validation split -> one ledger line; the final model on the test
split. `strategies.server_app` holds the ServerApp object and imports this module when its
main runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import log
from flwr.serverapp import Grid

from fedtune.compat.flower_deploy import is_simulation_grid
from fedtune.config import ExperimentConfig
from fedtune.config.errors import ConfigError, DeployError
from fedtune.models.pruning_setup import pruning_record, resolve_config
from fedtune.privacy.plan import PrivacyPlan
from fedtune.privacy.seeded_noise import check_server_runtime
from fedtune.run.atomic import write_text_atomic
from fedtune.run.checkpoint import (
    ServerState,
    load_checkpoint,
    privacy_fingerprint,
    save_checkpoint,
)
from fedtune.run.curator_log import (
    append_curator,
    curator_view,
    keeps_cohorts_apart,
    release_total,
    split_record,
)
from fedtune.run.epsilon_marks import note_fields, run_marks
from fedtune.run.export import save_tuned_state
from fedtune.run.folder import CONFIG_FILE, ROUNDS_FILE
from fedtune.run.ledger import Ledger, NoContributionError
from fedtune.run.records import Summary
from fedtune.runtime.interrupt import received
from fedtune.runtime.startup import mark, phase
from fedtune.runtime.torch_setup import configure_torch
from fedtune.runtime.worker_death import WorkerDiedError, stop_message, worker_death
from fedtune.split.disclosure import split_disclosure
from fedtune.split.ledger_fields import split_summary_fields
from fedtune.split.plan import smashed_privacy_events
from fedtune.task.evaluation import (
    final_metrics,
    round_metrics,
    untrained_metrics,
    validation_examples,
)
from fedtune.task.kinds import task_kind
from fedtune.task.reference import NoValidationError, reference_rows, validation_direction
from fedtune.task.task import Task, get_task
from fedtune.tuning import TunedModel
from fedtune.tuning.prefix_cache import skipped_layers
from fedtune.wire.fields import withholds_counts
from fedtune.wire.in_clear import in_clear
from strategies.delta_fedavg import DeltaFedAvg, RoundHooks
from strategies.discovery import Roster, discover, load_operator_roster
from strategies.grid_io import poll_interval
from strategies.plugins import Plugin, build_plugins
from strategies.preparation import Preparation, RoundCallback
from strategies.privacy_ledger import PrivacyLedger
from strategies.round import RoundSettings, play_round
from strategies.user_dp import UserLevelDP


def run_server(grid: Grid, cfg: ExperimentConfig, out_dir: Path,
               on_round: RoundCallback | None = None, resume: bool = False,
               roster: Roster | None = None,
               assigned: Mapping[int, int] | None = None) -> dict[str, Any]:
    """Run every round of `cfg` on `grid`, writing the run folder; returns the summary.
    With `resume`, continue the run in `out_dir` from its checkpoint. `roster`: the
    partitions' nodes, if discovered already (else discovered here, binding each node to
    the partition `assigned` gives it: a deployment's operator roster). Raises
    `NoContributionError` (after writing the ledger) when no client contributed in any
    round."""
    t0 = time.perf_counter()
    configure_torch()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolve_config(cfg)  # a pruning rule -> its layer list, as config.toml records it
    task = get_task(cfg)
    ledger = Ledger(out_dir)
    model = task.new_model()
    if resume:
        # Refuses a config whose privacy parameters differ from the checkpoint's.
        state = load_checkpoint(out_dir, task.spec.hash, privacy_fingerprint(cfg))
        ledger.restore(state.round, state.record)
        state.resumed_at.append(state.round)
    else:
        write_text_atomic(out_dir / CONFIG_FILE, cfg.to_toml())  # never through a link
        # The untrained model's figures are computed after the last round (`_initial`),
        # not here: scoring the test and validation splits before round 1 kept every
        # client waiting for it (seconds on the quickstart, minutes with a large model).
        state = ServerState(round=0, vector=task.initial_vector(), spec_hash=task.spec.hash,
                            initial={}, privacy=privacy_fingerprint(cfg))
        # Before round 1 is charged or sent: a run killed in round 1 stays resumable, and
        # the resume charges round 1's pending attempts (never dropped with the folder).
        save_checkpoint(out_dir, state)
    state.privacy = privacy_fingerprint(cfg)
    privacy = PrivacyLedger(PrivacyPlan.of(cfg), [len(p) for p in task.partitions], state,
                            out_dir, marks=run_marks(cfg))
    if cfg.split.enabled:
        # A split client that times out is charged its planned smashed-data releases too.
        privacy.releases.plan_hooks.append(lambda rnd, pid, n: smashed_privacy_events(cfg, n))
    plugins = build_plugins(cfg)
    privacy.releases.size_hooks += [plugin.trained_sizes for plugin in plugins]
    hooks = RoundHooks(
        # A client restarted since its last round (its own record lost) resumes its DP
        # accounting from what the server holds, never from zero.
        dp_history=lambda pid: state.client_dp.get(pid),
        plugin_settings=lambda rnd, pid: _plugin_settings(rnd, pid, plugins),
        select_cohort=lambda rnd, pids: _select_cohort(rnd, pids, plugins),
        client_weight=lambda rnd, pid: _client_weight(rnd, pid, plugins))
    strategy = DeltaFedAvg(task.spec, cfg.train.clients_per_round, cfg.seed, hooks,
                           cfg.aggregation.for_sample_dp(cfg.privacy.sample.enabled),
                           withhold_metrics=withholds_counts(cfg),  # (wire_fields)
                           report_groups=_report_groups(cfg.split.enabled, plugins),
                           reference=_reference(task, model, cfg))
    driver: DeltaFedAvg | UserLevelDP = strategy
    if privacy.user is not None:
        driver = UserLevelDP(strategy, cfg.privacy.user, privacy.user.noise_multiplier,
                             cfg.data.num_clients,
                             reproducible_seed=cfg.seed if cfg.privacy.reproducible_noise
                             else None)
    # Discovery's refused claims, for the first round record after it.
    refused_claims: list[dict[str, Any]] = []
    if state.round < cfg.train.rounds and state.stopped is None:
        strategy.adopt(roster or discover_workers(grid, cfg, assigned=assigned),
                       [len(p) for p in task.partitions])
        # Weights and DP plans from the counts the server holds, fixed for the run (a
        # resume keeps the first discovery's); a count it does not admit takes its node out.
        strategy.refuse(privacy.use_example_counts(strategy.examples, strategy.claimed))
        refused_claims = list(strategy.refused_claims)
        mark("first round starts", f"round {state.round + 1}")
    elapsed_before = state.elapsed_s
    # The rounds as rounds.jsonl holds them: a resumed run's earlier rounds, read once.
    history = ledger.rounds() if resume else []
    settings = _round_settings(cfg, grid, task, model)
    # Only the simulation engine's own failures can say a worker died (a node's are its text).
    simulation = is_simulation_grid(grid)

    for rnd in range(state.round + 1, cfg.train.rounds + 1):
        if state.stopped is not None or received():
            break
        # Sampled once, before anything is sent: the budget check and the instructions
        # see the same cohort (under user-level DP it is a secret draw).
        cohort = driver.sample(rnd, grid)
        stop = privacy.stop(rnd, cohort)
        if stop is not None:
            log(WARNING, "privacy budget: stopping before round %d: %s", rnd, stop.release)
            state.stopped = {"before_round": rnd, "reason": stop.release}
            if stop.curator != stop.release:  # it names a client of the secret cohort
                append_curator(out_dir, {"round": rnd, "stopped": {
                    "before_round": rnd, "reason": stop.curator}})
            break
        record = play_round(rnd, cohort, grid, driver, privacy, plugins, state, settings,
                            refused_claims).to_json()
        refused_claims = []
        death = worker_death(record.get("failed") or []) if simulation else None
        # Under user-level DP the cohort and per-client figures are the curator's log.
        record, curator = split_record(record, cfg)
        state.round, state.record = rnd, record
        state.elapsed_s = elapsed_before + time.perf_counter() - t0
        save_checkpoint(out_dir, state)  # first: a kill between the two loses nothing
        if curator is not None:
            append_curator(out_dir, curator)
        ledger.append_round(record)
        history.append(record)
        if on_round is not None:
            on_round(record)
        if death is not None:
            # After the round's checkpoint and ledger line: the folder resumes from here.
            log(WARNING, "stopping after round %d: a simulation worker died (%s)", rnd, death)
            raise WorkerDiedError(stop_message(rnd, death, out_dir))

    if received():
        # Ctrl-C or SIGTERM: no new round starts and no summary is written; the folder
        # stays resumable from its last checkpoint while the process ends.
        log(WARNING, "stopped by %s after round %d", received(), state.round)
        return {}
    if not history:
        raise RuntimeError(f"no round ran: {state.stopped['reason'] if state.stopped else ''}")
    # Under user-level DP the release holds null here: the curator's log has the answer,
    # and the run ends as any other (an error, a missing summary or final state would say
    # that every secret draw was empty).
    nobody = all(r.get("no_contribution") for r in curator_view(history, out_dir))
    if nobody and privacy.cohort_secret:
        append_curator(out_dir, {"round": state.round, "no_contribution_in_any_round": True})
    elif nobody:
        refused = [r["update_refused"] for r in history if r.get("update_refused")]
        why = (f"; {len(refused)} round(s) refused their update, the first because "
               f"{refused[0]}" if refused else "")
        raise NoContributionError(
            f"no client contributed in any of the {len(history)} rounds (every sampled "
            f"client failed, was rejected or was not sampled, or the round refused its "
            f"update){why}; see the rejected, failed and update_refused entries in "
            f"{out_dir / ROUNDS_FILE}")
    save_tuned_state(out_dir, task.new_model(), task.spec, task.spec.unflatten(state.vector),
                     task.label_names)
    if not state.initial:
        state.initial = _initial(task, model, cfg)
    final_test = final_metrics(task, model, state.vector, cfg)  # the one test read
    state.elapsed_s = elapsed_before + time.perf_counter() - t0
    if privacy.cohort_secret:  # the run's length is the sum of the rounds' (secret) wall_s
        append_curator(out_dir, {"round": state.round, "run": {"wall_s": state.elapsed_s}})
    summary = _summary(history, state, task, cfg, final_test, privacy.spent()).to_json()
    ledger.write_summary(summary)
    return summary


def _reference(task: Task, model: TunedModel, cfg: ExperimentConfig
               ) -> Callable[[np.ndarray], np.ndarray] | None:
    """The server's validation direction at a global vector, where the direction check
    uses it (`aggregation.norm_bound_direction = "validation"`); refused at start-up when
    the task has no validation rows (the config's data.validation_fraction = 0 is refused
    at load already)."""
    if cfg.aggregation.norm_bound_direction != "validation":
        return None
    try:
        reference_rows(task, cfg.aggregation.direction_reference_rows)
    except NoValidationError as exc:
        raise ConfigError(str(exc)) from None
    return lambda vector: validation_direction(task, model, vector, cfg)


def _report_groups(split: bool, plugins: list[Plugin]) -> set[str]:
    """The figure groups this run's clients report: split mode's, the plugins', and pruning
    in split mode's savings when both run."""
    groups = {group for plugin in plugins for group in plugin.report_groups()}
    if split:
        groups.add("split")
        if "pruning" in groups:
            groups.add("pruning_split")
    return groups


def _round_settings(cfg: ExperimentConfig, grid: Grid, task: Task, model: TunedModel
                    ) -> RoundSettings:
    """What every round needs from the run's config, read once."""
    train = cfg.train
    return RoundSettings(
        lr=train.lr, lr_decay=train.lr_decay, timeout_s=train.round_timeout_s,
        poll_s=poll_interval(grid, cfg),
        evaluate=lambda vector: round_metrics(task, model, vector, cfg),
        notes=lambda record: note_fields(cfg, dict(record)),
        forward_layers_skipped=skipped_layers(cfg, model),
        privacy_in_clear=in_clear(cfg),
        split_statement=split_disclosure(cfg),
        majority_val_accuracy=task_kind(cfg.task.kind).baseline(
            task, cfg)["majority_val_accuracy"])


def discover_workers(grid: Grid, cfg: ExperimentConfig,
                     abort: Callable[[], bool] | None = None,
                     assigned: Mapping[int, int] | None = None) -> Roster:
    """Discovery as a start-up phase: most of it is the workers starting (Ray actors
    importing torch and the client code before they can answer their first message)."""
    _require_operator_roster(grid, assigned)
    found = Roster()
    with phase("workers", lambda: f"{len(found.nodes)} clients answered"):
        found = discover(grid, cfg.data.num_clients, cfg.train.round_timeout_s, abort=abort,
                         assigned=assigned, pause=poll_interval(grid, cfg))
    return found


def _require_operator_roster(grid: Grid, assigned: Mapping[int, int] | None) -> None:
    """A deployment's nodes hold the partitions the operator's roster assigns them, never
    the ones they claim (the simulation engine assigns its nodes' partitions itself)."""
    if assigned is None and not is_simulation_grid(grid):
        raise DeployError("a deployment binds nodes to partitions from an operator roster: "
                          "pass run config roster='/abs/roster.json' (registered node id -> "
                          "partition id; docs/deployment.md, Node data)")


def _initial(task: Task, model: TunedModel, cfg: ExperimentConfig) -> dict[str, Any]:
    """The untrained model's baseline, computed at the end of the run: the seeded initial
    vector is rebuilt, so the figures are those a start-of-run evaluation gives (nothing
    trained reads them; the summary says when they were computed). A repeat run of the task
    reads them from the task cache (`untrained_metrics`): the same figures, bit for bit."""
    metrics = untrained_metrics(task, model, cfg)
    return {**metrics, "evaluated": "after the last round (deferred from start-up; "
                                    "same untrained model)"}


# The ledger's fields summary.json takes from it (`PrivacyLedger.fields`), as one set.
PRIVACY_FIELDS = ("epsilon_sample", "epsilon_user", "delta", "noise", "privacy_sample",
                  "privacy_user")
PRIVACY_SECTIONS = ("privacy_sample", "privacy_user")


def released_spend(spent: dict[str, Any], last: dict[str, Any], cfg: ExperimentConfig
                   ) -> dict[str, Any]:
    """The ledger's fields at the end as the summary releases them: each privacy section over
    the last round's (so the keys a round adds, e.g. `aggregated_delta_norms`, stay), then
    through the rounds' own release split, so that under a secret cohort the per-client
    parts (histories, epsilon_by_client: keyed by sampled partitions) go to the curator's
    log and leave its pointer, as in `rounds.jsonl`."""
    merged = dict(spent)
    for section in PRIVACY_SECTIONS:
        if isinstance(spent.get(section), dict) and isinstance(last.get(section), dict):
            merged[section] = {**last[section], **spent[section]}
    released, _ = split_record(merged, cfg)
    return released


def _summary(history: list[dict[str, Any]], state: ServerState, task: Task,
             cfg: ExperimentConfig, final_test: dict[str, float],
             spent: dict[str, Any] | None = None) -> Summary:
    """`spent`: the privacy ledger's fields now (`PrivacyLedger.spent`: both epsilons and
    the privacy sections that reproduce them), which can pass the last round's (a resumed
    run charges its interrupted attempt, and a budget stop may then end the run before that
    round completes): the epsilons and the parameters printed beside them are taken
    together, so the summary's privacy_sample reproduces its epsilon_sample; without it,
    the last round's."""
    last = history[-1]
    spent = released_spend({**{key: last.get(key) for key in PRIVACY_FIELDS}, **(spent or {})},
                           last, cfg)
    kind = task_kind(cfg.task.kind)
    return Summary(
        # Accuracy or perplexity fields (the other kind's null), the best round by validation.
        accuracy=kind.summary_fields(history, state.initial, final_test,
                                     validation_examples(task, cfg)),
        # Runs checkpointed before the deferral scored the untrained model before round 1.
        initial_evaluated=state.initial.get("evaluated", "before round 1"),
        epsilon_sample=spent["epsilon_sample"],
        epsilon_user=spent["epsilon_user"],
        delta=spent["delta"],
        notes=note_fields(cfg, last),
        noise=spent["noise"],
        privacy_sample=spent["privacy_sample"],
        privacy_user=spent["privacy_user"],
        rounds=len(history),
        stopped_early=state.stopped,
        total_bytes_up=release_total(history, "bytes_up"),
        total_bytes_down=release_total(history, "bytes_down"),
        total_client_flops=release_total(history, "client_flops"),
        trainable_params=task.spec.size,
        backbone_params=task.backbone.num_params,
        method=cfg.tuning.method,
        resumed_at_rounds=state.resumed_at,
        wall_s=None if keeps_cohorts_apart(cfg) else state.elapsed_s,  # the curator's has it
        population=_population(cfg),
        split=split_summary_fields(history),
        pruning=pruning_record(task.backbone, cfg.model.max_length),
        baseline=kind.baseline(task, cfg),
    )


def _population(cfg: ExperimentConfig) -> dict[str, Any]:
    """Who the accuracy is about: with two domains, the target domain's test rows only."""
    data = cfg.data
    if not data.domain_by:
        return {}
    return {"eval_domain": data.eval_domain,
            "target_clients": data.target_clients, "source_clients": data.source_clients}


def _plugin_settings(rnd: int, pid: int, plugins: list[Plugin]) -> dict[str, Any]:
    """What the plugins ask of this client: `TrainInstruction` fields by name."""
    settings: dict[str, Any] = {}
    for plugin in plugins:
        settings.update(plugin.client_config(rnd, pid))
    return settings


def _select_cohort(rnd: int, pids: list[int], plugins: list[Plugin]) -> list[int]:
    for plugin in plugins:
        pids = plugin.select_cohort(rnd, pids)
    return pids


def _client_weight(rnd: int, pid: int, plugins: list[Plugin]) -> float:
    weight = 1.0
    for plugin in plugins:
        weight *= plugin.client_weight(rnd, pid)
    return weight


def serve(grid: Grid, cfg: ExperimentConfig, out_dir: Path, on_round: RoundCallback | None,
          resume: bool, prepare: Preparation | None, roster_file: str | None = None
          ) -> dict[str, Any]:
    """The ServerApp's body (`strategies.server_app.build_server_app`). `roster_file`:
    a deployment's operator roster (`strategies.discovery.load_operator_roster`)."""
    check_server_runtime(cfg, grid)  # seeded noise only in simulation
    assigned = (load_operator_roster(roster_file, cfg.data.num_clients)
                if roster_file else None)
    _require_operator_roster(grid, assigned)  # before the run folder or the task
    roster = None
    if prepare is not None:
        roster = discover_workers(grid, cfg, abort=lambda: prepare.failed() or bool(received()),
                                  assigned=assigned)
        prepare.finish()
    summary = run_server(grid, cfg, out_dir, on_round, resume=resume, roster=roster,
                         assigned=assigned)
    if prepare is not None:
        prepare.summary(summary)
    return summary

