"""Seconds per DP-SGD step and peak memory of fedtune's causal-LM client step against the
bare loop it is compared with (issue 29's speed goal: fedtune's LM round within 1.15x of
the bare loop on the same work): LoRA (r=8, alpha 16, q_proj/v_proj) + Opacus DP-SGD
(hooks, noise 1.0, clip 1.0, SGD) on SmolLM2-135M-Instruct, fixed batches of 8 list-ham
training messages x 128 tokens.

The loops meet at one boundary: `ham_batches` makes the batches (the same ones for every
loop), and each entry of `LOOPS` takes the loaded model, the batches and the settings and
returns `Figures`. Each process runs one loop (`--loop`), so the peak resident set it
reports is that loop's alone.

- `bare`: HF transformers + peft + Opacus as their documentation shows them, nothing of
  fedtune's.
- `fedtune`: the code a client runs in a round (`clients.train.local_train`), fed the same
  fixed batches. local_train draws its own Poisson batches, so the batches enter one seam
  below it; everything else is fedtune's own. Timed per step, as local_train's loop body
  does it: `zero_grad`, `clients.train.PlainStep` (the LoRA model's forward, the causal-LM
  task kind's `NextTokenLoss` on `lm_targets` labels, backward through Opacus' hooks),
  the optimizer step of `fedtune.privacy.make_private`'s DP optimizer (per-sample
  clipping, noise from fedtune's secret DP source), `loss.item()`.
  Set up once, outside the step timing, reported as `setup_s`: freezing and hashing the
  backbone (`backbone_from_model`), building the LoRA model (`build_tuned_model`: a
  private deep copy of the decoder + peft), `make_private`. After the steps, reported as
  `after_s` (per round, not per step): removing Opacus' hooks, the accountant's epsilon of
  the steps (noise > 0 only; q = 1 here, a real round's q is smaller), the FLOP count of
  one example (once per process and model shape).
  Not run at all: the Poisson sampling of the batches (the seam), the noise calibration
  (`planned_release`: the noise multiplier is given), local_train's per-batch bookkeeping
  (moving the batch to the model's device, a no-op on the CPU; the empty-batch test; the
  example count), loading the global vector and flattening the delta, the wire, Ray and
  Flower.
  The bare loop's peft draws its LoRA init after `torch.manual_seed(--seed)`, as fedtune's
  builder does with the same seed, so both loops start from the same adapters.

Run one loop, the first-step check (noise 0, the same batch and init: the two loops'
first losses and adapter updates must agree to float tolerance), or both loops alternately
in fresh processes (the ratio of the medians is the last line, `ratio=X`):

    flock /tmp/fedtune-e2e.lock python benchmarks/lm_step.py --loop bare --steps 5
    flock /tmp/fedtune-e2e.lock python benchmarks/lm_step.py --loop fedtune --steps 5
    flock /tmp/fedtune-e2e.lock python benchmarks/lm_step.py --check
    flock /tmp/fedtune-e2e.lock python benchmarks/lm_step.py --alternate 3 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, attention_mask: [batch, seq] each
TARGETS = ["q_proj", "v_proj"]
BACKBONE = "smollm2"  # the name fedtune's config gives the model (the model itself is passed)
# The first-step check: the loops' adapter updates agree to this, relative to the largest
# entry of the bare loop's (float32, the same operations in different orders).
CHECK_RTOL = 1e-4


@dataclass
class Figures:
    step_s: list[float] = field(default_factory=list)  # each timed step, warm-up excluded
    cpu_s: list[float] = field(default_factory=list)  # this process' CPU seconds per step
    losses: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # peak resident set during the steps (load excluded if possible)
    rss_after_load_mb: float = 0.0
    setup_s: dict[str, float] = field(default_factory=dict)  # once, before the steps
    after_s: dict[str, float] = field(default_factory=dict)  # once per round, after them
    notes: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """A loop set up on a model: `step` trains on one batch and returns its loss;
    `trainable` reads the tensors it trains (name -> tensor); `finish` runs what a round
    does after its steps and returns the seconds of each part."""

    step: Callable[[Batch], float]
    trainable: Callable[[], dict[str, torch.Tensor]]
    setup_s: dict[str, float] = field(default_factory=dict)
    finish: Callable[[], dict[str, float]] = dict


def ham_batches(tokenizer: Any, steps: int, batch_size: int, seq: int) -> list[Batch]:
    """`steps` fixed batches of list-ham training messages, each truncated or padded (right,
    masked) to `seq` tokens: every loop gets exactly these."""
    from smollm2 import list_ham

    texts = list_ham("train")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for step in range(steps):
        chunk = [texts[(step * batch_size + i) % len(texts)] for i in range(batch_size)]
        enc = tokenizer(chunk, truncation=True, max_length=seq, padding="max_length",
                        return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        batches.append((ids.masked_fill(mask == 0, pad), mask))
    return batches


def sequence_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sequence's mean next-token loss: one sequence is one
    example (the DP unit), so each row's loss is its own, whatever the others' lengths."""
    target, keep = ids[:, 1:], mask[:, 1:].to(logits.dtype)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target,
                                            reduction="none")
    return ((nll * keep).sum(1) / keep.sum(1).clamp(min=1)).mean()


class _Clock:
    """Seconds of each named set-up part, in order."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] = now - self._last
        self._last = now


def prepare_bare(model: Any, batches: list[Batch], args: argparse.Namespace) -> Prepared:
    """HF + peft + Opacus, as their documentation shows them, nothing of fedtune's."""
    from opacus import PrivacyEngine
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, TensorDataset

    clock = _Clock()
    torch.manual_seed(args.seed)  # peft's lora_A draws: the init fedtune's builder makes
    tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=TARGETS))
    tuned.train()
    clock.lap("peft_s")
    optimizer = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=args.lr)
    # The loader only tells Opacus the batch size; the fixed batches are fed directly (no
    # Poisson sampling), so every loop trains on the same rows. The noise comes from torch's
    # default generator: fine for timing, not for a privacy claim.
    ids, mask = batches[0]
    loader = DataLoader(TensorDataset(ids, mask), batch_size=len(ids))
    engine = PrivacyEngine(accountant="prv")
    private, optimizer, _ = engine.make_private(
        module=tuned, optimizer=optimizer, data_loader=loader, noise_multiplier=args.noise,
        max_grad_norm=args.clip, poisson_sampling=False, grad_sample_mode="hooks")
    clock.lap("make_private_s")

    def step(batch: Batch) -> float:
        ids, mask = batch
        logits = private(input_ids=ids, attention_mask=mask).logits
        loss = sequence_loss(logits, ids, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def trainable() -> dict[str, torch.Tensor]:
        return {n: p for n, p in tuned.named_parameters() if p.requires_grad}

    return Prepared(step, trainable, clock.parts)


def fedtune_config(args: argparse.Namespace) -> Any:
    """The experiment config whose client step the `fedtune` loop runs: the bare loop's
    LoRA and DP settings (the adapters' rate is train.lr itself: lr_scale 1)."""
    from fedtune.config import load_config

    return load_config(None, [
        f'model.backbone="{BACKBONE}"', "task.kind=causal_lm", "data.partition=iid",
        f"model.max_length={args.seq}", "tuning.method=lora", "tuning.lora.r=8",
        "tuning.lora.alpha=16", f"tuning.lora.targets={json.dumps(TARGETS)}",
        "tuning.lora.lr_scale=1.0",
        "train.optimizer=sgd", f"train.lr={args.lr}", f"train.batch_size={args.batch_size}",
        "privacy.sample.enabled=true", f"privacy.sample.max_grad_norm={args.clip}",
        "privacy.sample.grad_sample_mode=hooks", "privacy.sample.accountant=prv",
        f"seed={args.seed}"])


def prepare_fedtune(model: Any, batches: list[Batch], args: argparse.Namespace) -> Prepared:
    """The causal-LM client step of `clients.train.local_train`, fed the fixed batches (see
    the module docstring for what is and is not timed)."""
    from torch.utils.data import DataLoader, TensorDataset

    from clients.train import PlainStep, flops_per_example
    from fedtune.models.backbone import backbone_from_model
    from fedtune.privacy import DPHistory, epsilon_of, make_private
    from fedtune.task.kinds import task_kind
    from fedtune.task.lm import lm_targets
    from fedtune.tuning import build_tuned_model

    cfg = fedtune_config(args)
    clock = _Clock()
    # What load_backbone does after loading: freeze in place, eval mode, hash the weights.
    # The LoRA builder reads only the model, not the tokenizer.
    backbone = backbone_from_model(BACKBONE, model, None)
    clock.lap("freeze_and_hash_s")
    tuned = build_tuned_model(backbone, cfg.tuning, 0, seed=cfg.seed, kind=cfg.task.kind)
    clock.lap("build_s")
    # The labels a causal-LM task stores next to the tokens (made once, at tokenization).
    labels = {id(ids): torch.from_numpy(lm_targets(ids.numpy(), mask.numpy())).long()
              for ids, mask in batches}
    ids, mask = batches[0]
    # make_private wraps this loader in fedtune's secret Poisson sampler (rate 1/len = 1);
    # the steps below never iterate it: the fixed batches enter here instead.
    loader = DataLoader(TensorDataset(ids, mask, labels[id(ids)]), batch_size=len(ids))
    optimizer = torch.optim.SGD(tuned.param_groups(cfg.train.lr))  # local_train's, for sgd
    private = make_private(tuned, optimizer, loader, cfg.privacy.sample, args.noise,
                           criterion=task_kind(cfg.task.kind).criterion())
    tuned.train()
    clock.lap("make_private_s")
    plain = PlainStep(tuned)
    steps_taken = []

    def step(batch: Batch) -> float:
        ids, mask = batch
        private.optimizer.zero_grad(set_to_none=True)
        loss = plain(private.model, private.criterion, ids, mask, labels[id(ids)],
                     len(steps_taken))
        private.optimizer.step()
        steps_taken.append(1)
        return loss.detach().item()

    def finish() -> dict[str, float]:
        after = _Clock()
        private.close()
        after.lap("close_s")
        if args.noise > 0 and steps_taken:
            history = DPHistory()
            history.add(args.noise, private.sample_rate, len(steps_taken))
            epsilon_of(history, cfg.privacy.sample.delta, cfg.privacy.sample.accountant)
            after.lap("account_s")
        flops_per_example(tuned, TensorDataset(ids, mask, labels[id(ids)]))
        after.lap("flops_s")
        return after.parts

    return Prepared(step, tuned.trainable_state, clock.parts, finish)


def timed(step: Callable[[Batch], float], batches: list[Batch], warmup: int) -> Figures:
    """Run `step` on every batch; the first `warmup` are not timed. Peak RSS is reset (where
    the kernel allows) after the warm-up, so it is the steps' peak, not the load's."""
    figures = Figures()
    for batch in batches[:warmup]:
        step(batch)
    if not _reset_peak_rss():
        figures.notes.append("peak RSS includes loading (clear_refs not writable)")
    for batch in batches[warmup:]:
        start, cpu = time.perf_counter(), time.process_time()
        figures.losses.append(step(batch))
        figures.step_s.append(time.perf_counter() - start)
        figures.cpu_s.append(time.process_time() - cpu)
    figures.peak_rss_mb = _status_mb("VmHWM")
    return figures


def run_loop(prepare: Callable[[Any, list[Batch], argparse.Namespace], Prepared]
             ) -> Callable[[Any, list[Batch], argparse.Namespace], Figures]:
    """A `LOOPS` entry: set the loop up, time its steps, then run its round's end."""

    def loop(model: Any, batches: list[Batch], args: argparse.Namespace) -> Figures:
        prepared = prepare(model, batches, args)
        figures = timed(prepared.step, batches, args.warmup)
        figures.setup_s = prepared.setup_s
        figures.after_s = prepared.finish()
        return figures

    return loop


# One entry per side of the comparison.
PREPARE: dict[str, Callable[[Any, list[Batch], argparse.Namespace], Prepared]] = {
    "bare": prepare_bare,
    "fedtune": prepare_fedtune,
}
LOOPS: dict[str, Callable[[Any, list[Batch], argparse.Namespace], Figures]] = {
    name: run_loop(prepare) for name, prepare in PREPARE.items()}


def _adapter_key(name: str) -> str:
    """A LoRA tensor's name from its block on (`layers.0.self_attn.q_proj.lora_A...`): the
    loops wrap the decoder under different prefixes."""
    return name[name.index("layers."):] if "layers." in name else name


def first_step_check(model: Any, batch: Batch, args: argparse.Namespace) -> dict[str, Any]:
    """One step of every loop at noise 0 on `batch`, each on its own copy of `model`, from
    the same init: the losses and the adapters' updates (after - before), and whether they
    agree with the bare loop's to `CHECK_RTOL` of its largest update."""
    args = argparse.Namespace(**{**vars(args), "noise": 0.0})
    results: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
    for name, prepare in PREPARE.items():
        prepared = prepare(copy.deepcopy(model), [batch], args)
        before = {_adapter_key(k): v.detach().clone() for k, v in prepared.trainable().items()}
        loss = prepared.step(batch)
        after = {_adapter_key(k): v.detach() for k, v in prepared.trainable().items()}
        if set(after) != set(before):
            raise AssertionError(f"{name}: the trained tensors changed names")
        results[name] = (loss, {k: after[k] - before[k] for k in before})
        del prepared
        gc.collect()
    bare_loss, bare = results["bare"]
    scale = max(float(d.abs().max()) for d in bare.values())
    report: dict[str, Any] = {"bare_loss": bare_loss, "update_max": scale, "loops": {}}
    for name, (loss, delta) in results.items():
        if name == "bare":
            continue
        if set(delta) != set(bare):
            raise AssertionError(f"{name} trains other tensors than the bare loop: "
                                 f"{sorted(set(delta) ^ set(bare))[:4]}")
        diff = max(float((delta[k] - bare[k]).abs().max()) for k in bare)
        report["loops"][name] = {
            "loss": loss, "loss_diff": abs(loss - bare_loss), "update_diff": diff,
            "agree": abs(loss - bare_loss) <= 1e-5 * max(1.0, abs(bare_loss))
            and diff <= CHECK_RTOL * scale and scale > 0}
    return report


def compare_runs(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Figures of alternating runs (loop -> each run's `--json` figures): per loop the
    median over runs of each run's median s/step and CPU-s/step, and the largest peak RSS;
    `ratio` = fedtune's median s/step / the bare loop's (`cpu_ratio` the same in CPU-s)."""
    out: dict[str, Any] = {}
    for loop, figures in runs.items():
        out[loop] = {
            "runs": len(figures),
            "step_s": statistics.median(statistics.median(f["step_s"]) for f in figures),
            "cpu_s": statistics.median(statistics.median(f["cpu_s"]) for f in figures),
            "peak_rss_mb": max(f["peak_rss_mb"] for f in figures),
        }
    out["ratio"] = out["fedtune"]["step_s"] / out["bare"]["step_s"]
    out["cpu_ratio"] = out["fedtune"]["cpu_s"] / out["bare"]["cpu_s"]
    return out


def alternate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the bare and fedtune loops `args.alternate` times each in fresh processes, in
    alternating order (bare first, then fedtune first, ...) so that a drift of the
    machine's load falls on both; print and return `compare_runs`."""
    passed = [f"--steps={args.steps}", f"--warmup={args.warmup}",
              f"--batch-size={args.batch_size}", f"--seq={args.seq}", f"--lr={args.lr}",
              f"--noise={args.noise}", f"--clip={args.clip}", f"--threads={args.threads}",
              f"--seed={args.seed}"]
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "fedtune": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.alternate):
            order = ("bare", "fedtune") if i % 2 == 0 else ("fedtune", "bare")
            for loop in order:
                out = Path(tmp) / f"{loop}-{i}.json"
                subprocess.run([sys.executable, __file__, "--loop", loop, "--json", str(out),
                                *passed], check=True)
                runs[loop].append(json.loads(out.read_text()))
    summary = compare_runs(runs)
    for loop in ("bare", "fedtune"):
        s = summary[loop]
        print(f"{loop}: {s['runs']} runs, median s/step {s['step_s']:.3f}, CPU-s/step "
              f"{s['cpu_s']:.3f}, largest peak RSS {s['peak_rss_mb']:.0f} MB")
    print(f"fedtune / bare: s/step {summary['ratio']:.3f}, CPU-s/step "
          f"{summary['cpu_ratio']:.3f} (goal: <= 1.15)")
    print(f"ratio={summary['ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **summary}))
    return summary


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _parts(parts: dict[str, float]) -> str:
    return ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in parts.items()) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=sorted(LOOPS), default="bare")
    parser.add_argument("--check", action="store_true",
                        help="one step of each loop at noise 0 from the same init and batch: "
                             "exit 1 unless their losses and updates agree")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="run each loop N times in fresh processes, alternately, and "
                             "print the ratio of the medians")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the LoRA init of both loops")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.alternate:
        alternate(args)
        return
    # Known, harmless here: Opacus' secure-RNG advice, its hooks on frozen inputs.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from smollm2 import load_smollm2

    model, tokenizer, load_s = load_smollm2()
    if args.check:
        report = first_step_check(model, ham_batches(tokenizer, 1, args.batch_size,
                                                     args.seq)[0], args)
        print(json.dumps(report, indent=1))
        sys.exit(0 if all(r["agree"] for r in report["loops"].values()) else 1)
    batches = ham_batches(tokenizer, args.warmup + args.steps, args.batch_size, args.seq)
    rss_load = _status_mb("VmRSS")
    figures = LOOPS[args.loop](model, batches, args)
    figures.rss_after_load_mb = rss_load
    real = sum(int(m.sum()) for _, m in batches[args.warmup:])
    print(f"loop {args.loop}: SmolLM2 loaded in {load_s:.1f} s, torch threads "
          f"{torch.get_num_threads()}, {args.steps} timed steps of {args.batch_size} x "
          f"{args.seq} tokens ({real / args.steps:.0f} real tokens per batch on average), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"seconds per step: median {statistics.median(figures.step_s):.2f}, "
          f"min {min(figures.step_s):.2f}, max {max(figures.step_s):.2f}; CPU-s per step "
          f"median {statistics.median(figures.cpu_s):.2f}")
    print(f"RSS after load {figures.rss_after_load_mb:.0f} MB, peak during the steps "
          f"{figures.peak_rss_mb:.0f} MB; losses {', '.join(f'{x:.3f}' for x in figures.losses)}")
    print(f"set-up (once): {_parts(figures.setup_s)}; after the steps (per round): "
          f"{_parts(figures.after_s)}")
    for note in figures.notes:
        print("note:", note)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), **asdict(figures)}, fh)


if __name__ == "__main__":
    main()
