"""The ClientApp's handlers: receive the global trainable vector, train locally, reply with
the delta. `clients.app` holds the ClientApp object and imports this module where a handler
runs, so building the app never imports torch.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.common.constant import ErrorCode
from torch.utils.data import TensorDataset

from clients import split
from clients.faults import attack, corrupt, draw_fault, fail_before_training, withhold
from clients.node_data import (
    ExampleCountError,
    has_own_data,
    node_partition,
    own_example_count,
    training_data,
)
from clients.plugins import el2n as pruning
from clients.plugins.expansion import DomainWeighting, ImportanceStep
from clients.train import local_steps, local_train
from fedtune.config import ExperimentConfig
from fedtune.privacy import DPHistory
from fedtune.runtime.torch_setup import client_device, configure_torch
from fedtune.task.task import Task, get_task
from fedtune.tuning import TunedModel
from fedtune.wire.delta import clip_to_norm
from fedtune.wire.fields import withholds_counts
from fedtune.wire.protocol import (
    PartitionReply,
    ReportedDP,
    TrainInstruction,
    TrainReply,
    TrainReport,
)

DP_STATE_KEY = "fedtune-dp-history"


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31 - 1)


def handle_train(msg: Message, context: Context, cfg: ExperimentConfig,
                 task_bundle: str | None = None) -> Message:
    configure_torch(num_threads=int(cfg.simulation.num_cpus_per_client))
    device = client_device(cfg.simulation.num_gpus_per_client)
    task = get_task(cfg, task_bundle)
    partition_id = node_partition(context.node_config)
    order = TrainInstruction.from_record(msg.content, task.spec)
    try:
        # Before any training: the server charged this client for `order.examples` rows.
        data = training_data(context.node_config, task, partition_id, order.examples)
    except ExampleCountError as exc:
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(exc)), reply_to=msg)

    model = worker_model(task, device)
    model.load_trainable(task.spec.unflatten(order.vector))

    seed = client_seed(cfg.seed, order.server_round, partition_id)
    fault = draw_fault(cfg.faults, seed)
    if fault in ("crash", "hang"):
        fail_before_training(fault, cfg.faults, order.server_round)
    withhold(cfg.faults.attack_simulation, partition_id, order.server_round)  # benchmarks
    history = _load_history(context, order.dp_history)
    num_examples = len(data)
    view = split.split_view(model, task, cfg, context) if cfg.split.enabled else None
    selection = scorer = None
    if order.prune is not None:
        scorer = split.SplitScorer(view, cfg) if view is not None else pruning.ModelScorer(model)
        selection = pruning.select(scorer, data, order.prune, context, order.server_round)
        data = TensorDataset(*(t[selection.indices] for t in data.tensors))
    trained, step = model, None
    weighting = DomainWeighting.from_settings(order.domain)
    if view is not None:
        trained = view
        step = split.split_step(view, cfg, local_steps(cfg, len(data)), n=len(data), seed=seed)
    elif weighting is not None:
        step = ImportanceStep(weighting, model)
    result = local_train(trained, data, cfg, history, seed=seed, lr=order.lr, step=step)
    _save_history(context, history)
    if view is not None:
        split.save_aux(view, context)

    delta = task.spec.flatten(model.trainable_state()) - order.vector
    if order.clip_norm is not None:
        # User-level DP with client-side clipping: the server rejects anything longer.
        delta = clip_to_norm(delta, order.clip_norm)
    delta = attack(cfg.faults.attack_simulation, partition_id, delta)  # benchmarks only
    spec_hash = task.spec.hash
    encoding = cfg.delta.encoding
    if fault is not None:
        delta, spec_hash = corrupt(delta, spec_hash, fault)
        encoding = "float32"  # garbage as sent by a broken client, not refused by our encoder
    report = TrainReport(steps=result.steps)
    # Counts, real-row counts, FLOPs and the loss stay here when the server asks (user
    # level) or this client's own config withholds them (DP without
    # privacy.disclose_counts): none is covered by an epsilon (fedtune.wire.fields).
    if not (order.withhold_metrics or withholds_counts(cfg)):
        extras = dict(result.extras)
        flops = result.flops + (selection.scoring_flops if selection is not None else 0.0)
        if selection is not None:
            extras.update(pruning.round_metrics(selection, result, cfg, len(data)))
            scorer.add_costs(extras, selection, result, cfg, len(data))
        report = TrainReport(steps=result.steps, num_examples=num_examples, loss=result.loss,
                             examples_seen=result.examples_seen, flops=flops, extras=extras)
    dp = None
    if cfg.privacy.sample.enabled:
        dp = ReportedDP(noise_multiplier=result.noise_multiplier,
                        sample_rate=result.sample_rate, steps=result.steps,
                        epsilon=result.epsilon, history=history)
    reply = TrainReply.build(delta, spec_hash, report, dp, encoding, task.spec)
    return Message(content=reply.to_record(), reply_to=msg)


_MODELS: dict[tuple[str, str], TunedModel] = {}


def worker_model(task: Task, device: torch.device) -> TunedModel:
    """The model this worker process trains every client on, built on first use.

    Every trainable tensor is overwritten with the global vector before a client trains,
    and the frozen parts never change, so one model per process serves every virtual
    client. Building one per client and round cost a deep copy of the encoder for LoRA and
    BitFit (~90 MB, seconds on a loaded core) and a fresh allocation for every method.
    Opacus' hooks are removed after each client (`PrivateTraining.close`)."""
    key = (task.spec.hash, str(device))
    if key not in _MODELS:
        _MODELS.clear()  # another task in this process: the old model is not needed
        # On a GPU worker this also moves the process's shared frozen backbone, once.
        _MODELS[key] = task.new_model().to(device)
    return _MODELS[key]


def _load_history(context: Context, server: DPHistory | None) -> DPHistory:
    """This client's DP history: its own record, or the server's if that holds more steps
    (the client restarted and lost its own). Taking the longer one can only add spend."""
    own = DPHistory()
    record = context.state.config_records.get(DP_STATE_KEY)
    if record is not None:
        own = DPHistory.from_lists({k: list(record[k]) for k in ("sigma", "q", "steps")})
    if server is not None and server.steps > own.steps:
        return server
    return own


def _save_history(context: Context, history: DPHistory) -> None:
    if history.entries:
        context.state[DP_STATE_KEY] = ConfigRecord(history.to_lists())


def handle_query(msg: Message, context: Context, cfg: ExperimentConfig | None = None,
                 task_bundle: str | None = None) -> Message:
    """Tell the server which partition this node holds (node ids are random per run) and,
    for a node with its own data file, how many examples it trains on: the server fixes the
    node's weight and DP plan by that count for the run. A node on a corpus partition
    answers without building its task (the server knows the partition's size)."""
    own = None
    if has_own_data(context.node_config):
        from fedtune.config.flower_run import config_from_run_config

        task = get_task(cfg or config_from_run_config(context.run_config), task_bundle)
        own = own_example_count(context.node_config, task)
    reply = PartitionReply(node_partition(context.node_config), own)
    return Message(content=reply.to_record(), reply_to=msg)

