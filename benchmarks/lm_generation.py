"""Calibration of the generation metric (`fedtune.task.generation`) on the real SmolLM2:
continuation ROUGE-L of the untuned model for each (prompt tokens P, new tokens N), the wall
time of each, and the token-weighted perplexity on 128-token truncations, all on the first
ham test messages that came through a mailing list. With `--tune-steps`, the same figures
again after that many plain (no DP) LoRA steps (r=8, q_proj/v_proj, AdamW) on list ham from
the training split: whether the metric moves when the model gets better (discrimination),
and by how much against its own noise (paired standard error over the same messages).

    flock /tmp/fedtune-e2e.lock python benchmarks/lm_generation.py --examples 64 \\
        --prompt 32 64 --new 16 32 --tune-steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

import torch
from smollm2 import list_ham, load_smollm2, token_rows

from fedtune.task.generation import continuation_scores


@torch.inference_mode()
def perplexity(model: Any, rows: list[list[int]], batch_size: int) -> float:
    """exp(sum of next-token NLL / number of predicted tokens): token-weighted."""
    nll, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(batch):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target, keep = ids[:, 1:], mask[:, 1:].bool()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target,
                                                   reduction="none")
        nll += float(losses[keep].sum())
        count += int(keep.sum())
    return math.exp(nll / count)


def lora_tune(model: Any, rows: list[list[int]], steps: int, lr: float) -> Any:
    """Plain LoRA steps on batches of 8 rows (no DP): a better model to compare against."""
    from peft import LoraConfig, get_peft_model

    tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    tuned.train()
    for step in range(steps):
        batch = [rows[(step * 8 + i) % len(rows)] for i in range(8)]
        width = max(map(len, batch))
        ids = torch.zeros((8, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(batch):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tuned.eval()


def measure(model: Any, tokenizer: Any, rows: list[list[int]], args: argparse.Namespace,
            label: str) -> dict[str, Any]:
    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits

    out: dict[str, Any] = {}
    start = time.perf_counter()
    out["perplexity"] = perplexity(model, rows[:args.ppl_examples], args.batch_size)
    print(f"[{label}] perplexity {out['perplexity']:.2f} on {args.ppl_examples} x "
          f"<=128 tokens, {time.perf_counter() - start:.1f} s", flush=True)
    for p in args.prompt:
        for n in args.new:
            start, cpu = time.perf_counter(), time.process_time()
            scores, short, no_words = continuation_scores(
                logits_fn, tokenizer, rows, p, n, args.examples, args.batch_size)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            mean = statistics.fmean(scores)
            se = statistics.stdev(scores) / math.sqrt(len(scores))
            out[f"P{p}_N{n}"] = {"rouge_l": mean, "se": se, "examples": len(scores),
                                 "skipped_short": short, "skipped_no_words": no_words,
                                 "wall_s": wall, "cpu_s": cpu, "load": os.getloadavg()[0],
                                 "scores": scores}
            print(f"[{label}] P={p} N={n}: ROUGE-L {mean:.4f} (se {se:.4f}, "
                  f"{len(scores)} examples, {short} short, {no_words} without words), "
                  f"{wall:.1f} s wall, {cpu:.1f} CPU-s, load {os.getloadavg()[0]:.1f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--new", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--ppl-examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tune-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # LoRA's initialisation: the tuned comparison re-runs the same
    model, tokenizer, load_s = load_smollm2()
    rows = token_rows(tokenizer, list_ham("test"), 128)
    print(f"SmolLM2 loaded in {load_s:.1f} s; {len(rows)} list-ham test messages; torch "
          f"threads {torch.get_num_threads()}", flush=True)
    figures = {"untuned": measure(model, tokenizer, rows, args, "untuned")}
    if args.tune_steps:
        train = token_rows(tokenizer, list_ham("train"), 128)
        start = time.perf_counter()
        tuned = lora_tune(model, train, args.tune_steps, args.lr)
        print(f"LoRA: {args.tune_steps} steps in {time.perf_counter() - start:.1f} s",
              flush=True)
        figures["tuned"] = measure(tuned, tokenizer, rows, args, "tuned")
        for key, base in figures["untuned"].items():
            if key == "perplexity":
                continue
            diff = [b - a for a, b in zip(base["scores"], figures["tuned"][key]["scores"],
                                          strict=True)]
            print(f"{key}: tuned - untuned ROUGE-L {statistics.fmean(diff):+.4f} (paired se "
                  f"{statistics.stdev(diff) / math.sqrt(len(diff)):.4f})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh)


if __name__ == "__main__":
    main()
