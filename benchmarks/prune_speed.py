"""Client examples per second with and without `model.prune_layers`, side by side in one
process: for each method, the unpruned and the pruned MiniLM take turns (a warm-up round
each, then `--repeats` timed pairs, the order alternating), so load from other processes
hits both alike; the figure is the median over pairs of the pair's rate ratio. DP-SGD on
(Opacus, Poisson batches of expected size 32), max_length 64. Also printed: the ratio of
training FLOPs per example (torch's FlopCounterMode), which no load distorts.

    python benchmarks/prune_speed.py --prune importance:2 --steps 3 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from clients.train import local_train
from fedtune.config import load_config
from fedtune.models import backbone_for
from fedtune.privacy import DPHistory
from fedtune.runtime.torch_setup import configure_torch
from fedtune.tuning import build_tuned_model


def _data(n: int, seq: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (n, seq), generator=g)
    return TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (n,), generator=g))


def _train_flops(model: torch.nn.Module, data: TensorDataset) -> float:
    """Forward + backward FLOPs of one example. Counted here, not with
    clients.train.flops_per_example: its per-process cache is keyed by method and trainable
    size, which a pruned and an unpruned prompt model share."""
    ids, mask, _ = data[0]
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids.unsqueeze(0), mask.unsqueeze(0)).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prune", default="importance:2", help="model.prune_layers value")
    parser.add_argument("--methods", default="prompt,lora")
    parser.add_argument("--steps", type=int, default=3, help="DP steps per timed round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    configure_torch()
    data = _data(320, args.max_length)  # q = 1/ceil(320/32): expected batch 32
    print(f"torch threads {torch.get_num_threads()}, prune {args.prune!r}, "
          f"{args.steps} DP steps x {args.repeats} repeats, max_length {args.max_length}")
    for method in args.methods.split(","):
        models = {}
        for label, prune in (("full", "[]"), ("pruned", f'"{args.prune}"')):
            cfg = load_config(None, [f"tuning.method={method}", f"model.prune_layers={prune}",
                                     f"model.max_length={args.max_length}",
                                     "train.batch_size=32", f"train.local_steps={args.steps}",
                                     "privacy.sample.enabled=true"])
            backbone = backbone_for(cfg.model)
            models[label] = (cfg, build_tuned_model(backbone, cfg.tuning, 2, seed=0),
                             backbone.layers_kept)
        for cfg, model, _kept in models.values():  # warm-up: not counted
            local_train(model, data, cfg, DPHistory(), seed=0)
        ratios, rates = [], {label: [] for label in models}
        for rep in range(1, args.repeats + 1):
            order = list(models) if rep % 2 else list(models)[::-1]
            pair = {}
            for label in order:
                cfg, model, _kept = models[label]
                t0 = time.perf_counter()
                result = local_train(model, data, cfg, DPHistory(), seed=rep)
                pair[label] = result.examples_seen / (time.perf_counter() - t0)
                rates[label].append(pair[label])
            ratios.append(pair["pruned"] / pair["full"])
        flops = {label: _train_flops(model, data) for label, (_c, model, _k)
                 in models.items()}
        print(f"{method:7s} full {statistics.median(rates['full']):6.1f} ex/s  pruned (kept "
              f"{list(models['pruned'][2])}) {statistics.median(rates['pruned']):6.1f} ex/s  "
              f"speed ratio median {statistics.median(ratios):.2f}x (pairs: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})  FLOPs ratio "
              f"{flops['full'] / flops['pruned']:.2f}x")

if __name__ == "__main__":
    main()
