"""The ServerApp: rounds of sample -> send global vector -> aggregate deltas -> evaluate
centrally on the held-out split -> one ledger line.

`build_server_app(cfg, out_dir)` is the `fedtune run` path; the module-level `app` reads
the experiment from Flower's run config (the `flwr run` path).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedtune.checkpoint import ServerState, load_checkpoint, save_checkpoint
from fedtune.config import ExperimentConfig
from fedtune.delta import decode, encode
from fedtune.export import save_tuned_state
from fedtune.ledger import CONFIG_FILE, Ledger
from fedtune.privacy import DPHistory
from fedtune.runconfig import config_from_run_config
from fedtune.task import Task, evaluate, get_task
from fedtune.tuning import TunedModel
from strategies.delta_fedavg import DeltaFedAvg

RoundCallback = Callable[[dict[str, Any]], None]


def run_server(grid: Grid, cfg: ExperimentConfig, out_dir: Path,
               on_round: RoundCallback | None = None, resume: bool = False) -> dict[str, Any]:
    """Run every round of `cfg` on `grid`, writing the run folder; returns the summary.
    With `resume`, continue the run in `out_dir` from its checkpoint."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg)
    ledger = Ledger(out_dir)
    model = task.new_model()
    if resume:
        state = load_checkpoint(out_dir, task.spec.hash)
        ledger.restore(state.round, state.record)
        state.resumed_at.append(state.round)
    else:
        (out_dir / CONFIG_FILE).write_text(cfg.to_toml())
        vector = task.initial_vector()
        state = ServerState(round=0, vector=vector, spec_hash=task.spec.hash,
                            initial=_evaluate(task, model, vector, cfg))
    strategy = DeltaFedAvg(task.spec, cfg.train.clients_per_round, cfg.seed)
    strategy.client_config = lambda pid: _dp_history_config(state.client_dp.get(pid))
    if state.round < cfg.train.rounds:
        strategy.discover(grid, cfg.data.num_clients, timeout=cfg.train.round_timeout_s)
    elapsed_before = state.elapsed_s

    for rnd in range(state.round + 1, cfg.train.rounds + 1):
        record = _play_round(rnd, grid, strategy, task, model, state, cfg)
        state.round, state.record = rnd, record
        state.elapsed_s = elapsed_before + time.perf_counter() - t0
        save_checkpoint(out_dir, state)  # first: a kill between the two loses nothing
        ledger.append_round(record)
        if on_round is not None:
            on_round(record)

    save_tuned_state(out_dir, task.new_model(), task.spec, task.spec.unflatten(state.vector),
                     task.label_names)
    state.elapsed_s = elapsed_before + time.perf_counter() - t0
    summary = _summary(ledger.rounds(), state, task, cfg)
    ledger.write_summary(summary)
    return summary


def _play_round(rnd: int, grid: Grid, strategy: DeltaFedAvg, task: Task, model: TunedModel,
                state: ServerState, cfg: ExperimentConfig) -> dict[str, Any]:
    """One round: send the global vector, aggregate the replies, evaluate; updates `state`
    and returns the round's ledger record."""
    t_round = time.perf_counter()
    dp = cfg.privacy.sample
    lr = cfg.train.lr * cfg.train.lr_decay ** (rnd - 1)
    messages = strategy.configure_train(
        rnd, ArrayRecord({"vector": encode(state.vector)}), ConfigRecord({"lr": lr}), grid)
    replies = grid.send_and_receive(messages, timeout=cfg.train.round_timeout_s)
    arrays, _ = strategy.aggregate_train(rnd, replies)
    if arrays is not None:
        state.vector = decode(arrays["vector"], task.spec)
    outcome = strategy.outcome
    # Rejected replies count too: the client trained on its data and sent something.
    for client in outcome.accepted + outcome.rejected:
        if "partition_id" not in client:
            continue
        pid = int(client["partition_id"])
        if "epsilon" in client:
            state.client_eps[pid] = max(state.client_eps.get(pid, 0.0), float(client["epsilon"]))
        if float(client.get("noise_multiplier", 0.0)) > 0:
            state.client_dp.setdefault(pid, DPHistory()).add(
                float(client["noise_multiplier"]), float(client["sample_rate"]),
                int(client["steps"]))
    metrics = _evaluate(task, model, state.vector, cfg)
    accepted = outcome.accepted
    examples = sum(c["num_examples"] for c in accepted)
    return {
        "round": rnd,
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "epsilon_sample": max(state.client_eps.values()) if state.client_eps else None,
        "epsilon_user": None,
        "delta": dp.delta if dp.enabled else None,
        "clients": len(accepted),
        "bytes_up": outcome.bytes_up,
        "bytes_down": outcome.bytes_down,
        "client_flops": sum(c["flops"] for c in accepted),
        "wall_s": time.perf_counter() - t_round,
        "lr": lr,
        "train_loss": sum(c["loss"] * c["num_examples"] for c in accepted) / max(1, examples),
        "sampled": len(outcome.sampled),
        "rejected": outcome.rejected,
        "failed": outcome.failed,
        "per_client": accepted,
        "privacy_sample": _sample_dp_params(cfg) if dp.enabled else None,
    }


def _summary(history: list[dict[str, Any]], state: ServerState, task: Task,
             cfg: ExperimentConfig) -> dict[str, Any]:
    dp = cfg.privacy.sample
    n_test = len(task.test)
    if cfg.train.eval_max_examples > 0:
        n_test = min(n_test, cfg.train.eval_max_examples)
    return {
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in history),
        "initial_accuracy": state.initial["accuracy"],
        "epsilon_sample": history[-1]["epsilon_sample"],
        "epsilon_user": None,
        "delta": dp.delta if dp.enabled else None,
        "rounds": len(history),
        "total_bytes_up": sum(r["bytes_up"] for r in history),
        "total_bytes_down": sum(r["bytes_down"] for r in history),
        "total_client_flops": sum(r["client_flops"] for r in history),
        "trainable_params": task.spec.size,
        "backbone_params": task.backbone.num_params,
        "method": cfg.tuning.method,
        "test_examples": n_test,
        "resumed_at_rounds": state.resumed_at,
        "wall_s": state.elapsed_s,
    }


def _dp_history_config(history: DPHistory | None) -> dict[str, Any]:
    """The DP spend the server has recorded for a client, sent with its next task: a client
    restarted since (its own record lost) resumes accounting from here, never from zero."""
    if history is None or not history.entries:
        return {}
    lists = history.to_lists()
    return {"dp-history-sigma": lists["sigma"], "dp-history-q": lists["q"],
            "dp-history-steps": lists["steps"]}


def _evaluate(task: Task, model: torch.nn.Module, vector, cfg: ExperimentConfig
              ) -> dict[str, float]:
    with torch.no_grad():
        for name, tensor in task.spec.unflatten(vector).items():
            model.get_parameter(name).copy_(tensor)
    return evaluate(model, task.test, cfg.train.eval_batch_size, cfg.train.eval_max_examples)


def _sample_dp_params(cfg: ExperimentConfig) -> dict[str, Any]:
    dp = cfg.privacy.sample
    return {
        "accountant": dp.accountant,
        "delta": dp.delta,
        "max_grad_norm": dp.max_grad_norm,
        "target_epsilon": dp.target_epsilon if not dp.noise_multiplier else None,
        "planned_steps": cfg.train.rounds * cfg.train.local_steps,
        "grad_sample_mode": dp.grad_sample_mode,
    }


def build_server_app(cfg: ExperimentConfig | None = None, out_dir: Path | None = None,
                     on_round: RoundCallback | None = None, resume: bool = False) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or config_from_run_config(context.run_config)
        folder = out_dir or Path(str(context.run_config.get("out", "") or
                                     f"runs/{run_cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"))
        run_server(grid, run_cfg, folder, on_round, resume=resume)

    return app


app = build_server_app()
