"""What an honest-but-curious server learns from split traffic: the audit's attacks.

The victim is one client of a run, trained for one round through the real split client
(`clients.split.split_step`, the run's own settings, smashed DP included) against a body
that records every tensor it receives. The attacker is the server: it knows the frozen
backbone, the config and the global trainable state it sent (prompt and tail at round
start), and public text (other clients' data here, disjoint from the victim's). It does not
know the victim's tokens, labels, sampling or noise. Three attacks:

- tokens at cut 0: the cut-layer state at a token position is the embedding stage's output
  LN(word + position + type); nearest neighbour (cosine) against that table at the position.
- tokens at cut k >= 1: a ridge map (no intercept, so it is blind to clipping's scale) from
  cut-k states to word embeddings, fitted on public text run through the head with the
  global prompt; then nearest neighbour on the word-embedding table.
- labels: the uploaded body-output gradient of an example is compared (cosine) with the
  gradient of the loss for each candidate label, computed on the body output the server
  itself produced, through the global tail; the closest label is the guess.

Scores are over the victim's real examples and real (unpadded) token positions; baselines
are what the attacker gets without the traffic (most frequent public token; majority label).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, RecordDict
from torch.utils.data import TensorDataset

from fedtune.config import ExperimentConfig, load_config
from fedtune.run.epsilon_marks import Mark, epsilon_marks, epsilon_note, render_epsilon
from fedtune.run.ledger import CONFIG_FILE, SUMMARY_FILE
from fedtune.split import InProcessBody
from fedtune.split.flops import probing

RIDGE = 1e-2  # ridge penalty relative to the mean diagonal of the Gram matrix


@dataclass
class Exchange:
    rows: torch.Tensor  # cut-layer rows the body received
    mask: torch.Tensor  # the attention mask sent with them
    output: torch.Tensor  # what the body computed (the server keeps it)
    grad: torch.Tensor | None = None  # the body-output gradient rows received
    probe: bool = False  # the FLOP probe (synthetic text), not a training exchange

    def select(self, slots: torch.Tensor) -> Exchange:
        return Exchange(self.rows[slots], self.mask[slots], self.output[slots],
                        None if self.grad is None else self.grad[slots], self.probe)


class RecordingBody:
    """A `BodyService` that keeps what the server receives: the attacker's view, every
    call (training, scoring and the FLOP probe alike)."""

    def __init__(self, body: InProcessBody) -> None:
        self.body = body
        self.exchanges: list[Exchange] = []

    def forward(self, smashed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.body.forward(smashed, attention_mask)
        self._keep(smashed, attention_mask, output)
        return output

    def _keep(self, smashed: torch.Tensor, mask: torch.Tensor, output: torch.Tensor) -> None:
        self.exchanges.append(Exchange(smashed.detach().clone(), mask.clone(),
                                       output.clone(), probe=probing()))

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        self.exchanges[-1].grad = grad_output.detach().clone()
        return self.body.backward(grad_output)

    def evaluate(self, smashed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.body.evaluate(smashed, attention_mask)
        self._keep(smashed, attention_mask, output)
        return output


class _Observed:
    """The split step, noting which exchange carried which (ground-truth) batch."""

    def __init__(self, step: Any, body: RecordingBody) -> None:
        self.step, self.body = step, body
        # (exchange index, the batch's slots among the rows, ids, mask, labels)
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]] = []

    def __call__(self, model, criterion, ids, mask, labels, index):  # noqa: ANN001
        loss = self.step(model, criterion, ids, mask, labels, index)
        if index >= self.step.local_loss_steps:
            # Dummy exchanges of skipped steps go first; the batch's own is the last.
            self.batches.append((len(self.body.exchanges) - 1, self.step.last_slots.cpu(),
                                 ids, mask, labels))
        return loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self.step, name)


@dataclass
class AttackResult:
    cut_layer: int
    smashed_dp: bool
    examples: int
    tokens: int
    token_recovery: float
    token_baseline: float
    label_recovery: float
    label_baseline: float
    # Mean of per-label recall: 1 / num_labels for a guess that ignores the traffic.
    label_balanced: float
    epsilon: float | None
    # Every exchange the body received, and how many were the FLOP probe (synthetic text:
    # fedtune.split.flops; once per process, so 0 when an earlier round measured).
    exchanges: int = 0
    probe_exchanges: int = 0
    # What weakens `epsilon` (fedtune.run.epsilon_marks, from the replayed config): its
    # marks, shown beside it on the console, and its note, beside it in the JSON.
    marks: tuple[Mark, ...] = ()
    epsilon_note: str | None = None

    def epsilon_shown(self) -> str:
        """The client's epsilon as the console shows it: with its marks."""
        return render_epsilon(self.epsilon, self.marks, digits=3, off="none")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "marks"}


def audit_run(run: str | Path, overrides: list[str] | None = None, victim: int = 0,
              public_examples: int = 256, seed: int = 0) -> AttackResult:
    """Attack one round of client `victim` of run folder `run` (its config, with
    `overrides`, and its final trainable state as the global state the server sent)."""
    from fedtune.config.task import task_kind_spec
    from fedtune.run.export import load_tuned
    from fedtune.task.task import get_task

    run = Path(run)
    if not (run / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run} has no {CONFIG_FILE}: not a run folder")
    cfg = load_config(run / CONFIG_FILE, list(overrides or []))
    if not cfg.split.enabled:
        raise ValueError(f"{run} is not a split run (split.enabled=false): the server sees "
                         "deltas only, there is no smashed data to attack")
    if task_kind_spec(cfg.task.kind).unlabelled:  # the attack decodes tokens and classes
        raise ValueError(f"{run}: `fedtune audit split` attacks a classifier's split run; "
                         f"task.kind={cfg.task.kind!r} is not built for it yet")
    task = get_task(cfg)
    state = (load_tuned(run).model.trainable_state() if (run / SUMMARY_FILE).is_file()
             else None)
    return attack(cfg, task, state, victim, public_examples, seed)


def attack(cfg: ExperimentConfig, task: Any, state: dict[str, torch.Tensor] | None,
           victim: int, public_examples: int, seed: int) -> AttackResult:
    from clients import split as split_client
    from clients.train import local_steps, local_train
    from fedtune.privacy import DPHistory

    model = task.new_model()
    if state is not None:
        model.load_trainable(state)
    global_model = task.new_model()
    global_model.load_state_dict(model.state_dict())
    global_model.requires_grad_(False)

    data = task.client_data(victim)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    view = split_client.split_view(model, task, cfg, context)
    steps = local_steps(cfg, len(data))
    step = split_client.split_step(view, cfg, steps, n=len(data), seed=seed)
    recorder = RecordingBody(InProcessBody(view.split))
    step.body.body = recorder
    step.probe.body = recorder  # what measuring FLOPs sends is traffic too
    observed = _Observed(step, recorder)
    result = local_train(view, data, cfg, DPHistory(), seed=seed, step=observed)

    split = view.split
    public = _public_data(task, victim, public_examples)
    embeddings = split.model.get_input_embeddings().weight.detach()
    prompt_len = global_model.prompt.embedding.num_embeddings
    insert_at = global_model.insert_at
    if split.cut_layer == 0:
        decode = _cut0_decoder(split.model)
    else:
        decode = _ridge_decoder(global_model, split, public, embeddings)
    hits = total = 0
    examples = 0
    labels_all, guesses = [], []
    for index, slots, ids, mask, labels in observed.batches:
        # Scored on the victim's rows (the auditor knows where they sit; the attacker
        # decodes every row the same way and is not told).
        ex = recorder.exchanges[index].select(slots)
        b = labels.shape[0]
        positions = _token_positions(ids.shape[1], insert_at, prompt_len)
        rows = ex.rows[:, positions]  # (b, L, H): the victim's token positions
        guess = decode(rows, positions)
        real = mask.bool()
        hits += int((guess[real] == ids[real]).sum())
        total += int(real.sum())
        guesses.append(_guess_labels(global_model, ex, b, positions, task.num_labels))
        examples += b
        labels_all.append(labels)
    truth = torch.cat(labels_all) if labels_all else torch.zeros(0, dtype=torch.long)
    guess = torch.cat(guesses) if guesses else torch.zeros(0, dtype=torch.long)
    recalls = [float((guess[truth == c] == c).float().mean())
               for c in range(task.num_labels) if bool((truth == c).any())]
    public_ids, public_mask = public.tensors[0], public.tensors[1].bool()
    top_token = int(torch.mode(public_ids[public_mask]).values)
    token_base = sum(int((ids[mask.bool()] == top_token).sum())
                     for _, _, ids, mask, _ in observed.batches) / max(1, total)
    label_base = float(torch.bincount(truth, minlength=task.num_labels).max()) / max(
        1, examples)
    return AttackResult(
        cut_layer=split.cut_layer, smashed_dp=cfg.split.smashed_dp.enabled,
        examples=examples, tokens=total, token_recovery=hits / max(1, total),
        token_baseline=token_base,
        label_recovery=float((guess == truth).sum()) / max(1, examples),
        label_baseline=label_base,
        label_balanced=sum(recalls) / max(1, len(recalls)), epsilon=result.epsilon,
        exchanges=len(recorder.exchanges),
        probe_exchanges=sum(ex.probe for ex in recorder.exchanges),
        marks=tuple(epsilon_marks(cfg, "sample", result.epsilon)),
        epsilon_note=epsilon_note(cfg, "sample", result.epsilon))


def _token_positions(length: int, insert_at: int, prompt_len: int) -> torch.Tensor:
    """Where the input's own tokens sit in the cut-layer rows (the prompt is spliced in)."""
    return torch.cat([torch.arange(insert_at),
                      torch.arange(insert_at + prompt_len, length + prompt_len)])


def _public_data(task: Any, victim: int, limit: int) -> TensorDataset:
    """Text the attacker is assumed to hold: other clients' examples, never the victim's."""
    rows = np.concatenate([p for i, p in enumerate(task.partitions) if i != victim])
    return task.train.tensors(np.sort(rows)[:limit])


def _cut0_decoder(model: Any):
    """Nearest neighbour against LN(word + position + type) at each position (BERT-style
    embeddings; the attacker knows the backbone)."""
    if getattr(model.config, "model_type", "") != "bert":
        raise ValueError("the cut-0 attack knows BERT-style embedding stages only; "
                         f"got model_type={model.config.model_type!r}")
    emb = model.embeddings
    words = emb.word_embeddings.weight.detach()
    offset = emb.token_type_embeddings.weight.detach()[0]

    @torch.no_grad()
    def decode(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows.shape[:2], dtype=torch.long)
        # Rows are in the full sequence's positions (prompt included): the state at row j
        # carries position embedding j.
        for j, pos in enumerate(_full_positions(positions)):
            table = emb.LayerNorm(words + emb.position_embeddings.weight[pos] + offset)
            out[:, j] = _nearest(rows[:, j], table)
        return out

    return decode


def _full_positions(positions: torch.Tensor) -> list[int]:
    return [int(p) for p in positions]


def _ridge_decoder(global_model: Any, split: Any, public: TensorDataset,
                   embeddings: torch.Tensor):
    """A linear map from cut-k states to word embeddings, fitted on public text."""
    from fedtune.split import SplitPromptModel

    view = SplitPromptModel(global_model, split)
    prompt_len = global_model.prompt.embedding.num_embeddings
    xs, ys = [], []
    with torch.no_grad():
        for start in range(0, len(public), 64):
            ids, mask, _ = (t[start:start + 64] for t in public.tensors)
            states, _ = view.cut(ids, mask)
            positions = _token_positions(ids.shape[1], global_model.insert_at, prompt_len)
            real = mask.bool()
            xs.append(states[:, positions][real])
            ys.append(embeddings[ids[real]])
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    gram = x.T @ x
    penalty = RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weights = torch.linalg.solve(gram + penalty, x.T @ y).float()

    @torch.no_grad()
    def decode(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mapped = rows.reshape(-1, rows.shape[-1]) @ weights
        return _nearest(mapped, embeddings).reshape(rows.shape[:2])

    return decode


def _nearest(queries: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar table row for each query."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    t = torch.nn.functional.normalize(table.float(), dim=-1)
    best = []
    for chunk in q.split(1024):
        best.append((chunk @ t.T).argmax(dim=1))
    return torch.cat(best) if best else torch.zeros(0, dtype=torch.long)


def _guess_labels(global_model: Any, ex: Exchange, b: int, positions: torch.Tensor,
                  num_labels: int) -> torch.Tensor:
    """Per example, the label whose loss gradient at the body output (through the global
    tail, on the output the server computed) is closest in direction to the uploaded one."""
    if ex.grad is None:
        return torch.full((b,), -1)
    output = ex.output
    # The token mask the tail pools with, as far as the server knows it: the mask it was
    # sent, at the token positions (all ones under smashed DP).
    token_mask = ex.mask[:, positions]
    sims = []
    for label in range(num_labels):
        out = output.detach().clone().requires_grad_(True)
        logits = global_model.classify(out, token_mask)
        target = torch.full((b,), label, dtype=torch.long)
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, out)
        sims.append(torch.nn.functional.cosine_similarity(
            grad.reshape(b, -1), ex.grad.reshape(b, -1), dim=1))
    return torch.stack(sims, dim=1).argmax(dim=1)
