"""Seconds per DP-SGD step and peak memory of the bare loop fedtune's LM client step is
compared against (issue 29's speed goal: fedtune's LM round within 1.15x of the bare loop
on the same work): HF transformers + peft LoRA (r=8, q_proj/v_proj) + Opacus DP-SGD on
SmolLM2-135M-Instruct, fixed batches of 8 list-ham training messages x 128 tokens.

The halves meet at one boundary: `ham_batches` makes the batches (the same ones for every
loop), and each entry of `LOOPS` takes the loaded model, the batches and the settings and
returns `Figures`. The fedtune-side measurement is a second entry: the same batches
through fedtune's client step. Each process runs one loop (`--loop`), so the peak resident
set it reports is that loop's alone; run the loops alternately to compare under the same
load.

    flock /tmp/fedtune-e2e.lock python benchmarks/lm_step.py --loop bare --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from smollm2 import list_ham, load_smollm2

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, attention_mask: [batch, seq] each


@dataclass
class Figures:
    step_s: list[float] = field(default_factory=list)  # each timed step, warm-up excluded
    cpu_s: list[float] = field(default_factory=list)  # this process' CPU seconds per step
    losses: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # peak resident set during the steps (load excluded if possible)
    rss_after_load_mb: float = 0.0
    notes: list[str] = field(default_factory=list)


def ham_batches(tokenizer: Any, steps: int, batch_size: int, seq: int) -> list[Batch]:
    """`steps` fixed batches of list-ham training messages, each truncated or padded (right,
    masked) to `seq` tokens: every loop gets exactly these."""
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


def bare_loop(model: Any, batches: list[Batch], args: argparse.Namespace) -> Figures:
    """HF + peft + Opacus, as their documentation shows them, nothing of fedtune's."""
    from opacus import PrivacyEngine
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, TensorDataset

    tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    tuned.train()
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

    def step(batch: Batch) -> float:
        ids, mask = batch
        logits = private(input_ids=ids, attention_mask=mask).logits
        loss = sequence_loss(logits, ids, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return timed(step, batches, args.warmup)


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


# One entry per side of the comparison. The fedtune side (next): "fedtune", the same
# batches through fedtune's causal-LM client step (clients.train), same LoRA and DP settings.
LOOPS: dict[str, Callable[[Any, list[Batch], argparse.Namespace], Figures]] = {
    "bare": bare_loop,
}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=sorted(LOOPS), default="bare")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    # Known, harmless here: Opacus' secure-RNG advice, its hooks on frozen inputs.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, load_s = load_smollm2()
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
    for note in figures.notes:
        print("note:", note)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), **asdict(figures)}, fh)


if __name__ == "__main__":
    main()
