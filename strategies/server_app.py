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

from fedtune.config import ExperimentConfig
from fedtune.delta import decode, encode
from fedtune.export import save_tuned_state
from fedtune.ledger import CONFIG_FILE, Ledger
from fedtune.runconfig import config_from_run_config
from fedtune.task import Task, evaluate, get_task
from strategies.delta_fedavg import DeltaFedAvg

RoundCallback = Callable[[dict[str, Any]], None]


def run_server(grid: Grid, cfg: ExperimentConfig, out_dir: Path,
               on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run every round of `cfg` on `grid`, writing the run folder; returns the summary."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(cfg.to_toml())
    task = get_task(cfg)
    ledger = Ledger(out_dir)
    strategy = DeltaFedAvg(task.spec, cfg.train.clients_per_round, cfg.seed)
    strategy.discover(grid, cfg.data.num_clients, timeout=cfg.train.round_timeout_s)
    vector = task.initial_vector()
    model = task.new_model()
    initial = _evaluate(task, model, vector, cfg)
    dp = cfg.privacy.sample
    client_eps: dict[int, float] = {}
    history: list[dict[str, Any]] = []

    for rnd in range(1, cfg.train.rounds + 1):
        t_round = time.perf_counter()
        lr = cfg.train.lr * cfg.train.lr_decay ** (rnd - 1)
        messages = strategy.configure_train(
            rnd, ArrayRecord({"vector": encode(vector)}), ConfigRecord({"lr": lr}), grid)
        replies = grid.send_and_receive(messages, timeout=cfg.train.round_timeout_s)
        arrays, _ = strategy.aggregate_train(rnd, replies)
        if arrays is not None:
            vector = decode(arrays["vector"], task.spec)
        outcome = strategy.outcome
        # Rejected replies count too: the client trained on its data and sent something.
        for client in outcome.accepted + outcome.rejected:
            if "epsilon" in client and "partition_id" in client:
                pid = int(client["partition_id"])
                client_eps[pid] = max(client_eps.get(pid, 0.0), float(client["epsilon"]))
        metrics = _evaluate(task, model, vector, cfg)
        record = {
            "round": rnd,
            "accuracy": metrics["accuracy"],
            "loss": metrics["loss"],
            "epsilon_sample": max(client_eps.values()) if client_eps else None,
            "epsilon_user": None,
            "delta": dp.delta if dp.enabled else None,
            "clients": len(outcome.accepted),
            "bytes_up": outcome.bytes_up,
            "bytes_down": outcome.bytes_down,
            "client_flops": sum(c["flops"] for c in outcome.accepted),
            "wall_s": time.perf_counter() - t_round,
            "lr": lr,
            "train_loss": (sum(c["loss"] * c["num_examples"] for c in outcome.accepted)
                           / max(1, sum(c["num_examples"] for c in outcome.accepted))),
            "sampled": len(outcome.sampled),
            "rejected": outcome.rejected,
            "failed": outcome.failed,
            "per_client": outcome.accepted,
            "privacy_sample": _sample_dp_params(cfg) if dp.enabled else None,
        }
        ledger.append_round(record)
        history.append(record)
        if on_round is not None:
            on_round(record)

    save_tuned_state(out_dir, task.new_model(), task.spec, task.spec.unflatten(vector),
                     task.label_names)
    summary = {
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in history),
        "initial_accuracy": initial["accuracy"],
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
        "test_examples": int(metrics["examples"]),
        "wall_s": time.perf_counter() - t0,
    }
    ledger.write_summary(summary)
    return summary


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
                     on_round: RoundCallback | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or config_from_run_config(context.run_config)
        folder = out_dir or Path(str(context.run_config.get("out", "") or
                                     f"runs/{run_cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"))
        run_server(grid, run_cfg, folder, on_round)

    return app


app = build_server_app()
