"""Client-worker CPU seconds per local step of LoRA on a causal LM, unpruned against
pruned (`model.prune_layers`, at least 30 % of the blocks by default) and, optionally, each
also with LoRA from a layer (`tuning.lora.from_layer`: the steps start from the cached
states entering that block, `fedtune.tuning.prefix_cache`). Issue 29's goal: the pruned
model trains >= 1.8x faster per client-worker CPU second.

The variants run side by side in one process through the client's own `local_train`
(DP-SGD with Opacus, Poisson batches of expected size `--batch`, drawn alike for every
variant of a repeat): a warm-up round each (it also fills the prefix cache, a once-per-
client cost reported separately), then `--repeats` timed rounds of `--steps` steps, the
order rotating, so load from other processes hits every variant alike. The figure is the
process CPU time (`time.process_time`: every thread of this worker) of a round per example
trained, times `--batch` (CPU-s per step), median over repeats, and its ratio to the
unpruned model's (also per repeat, paired). Also printed: the training FLOPs per example
(torch's FlopCounterMode, which no load distorts).

Without `--backbone`, a random SmolLM2-shaped Llama (GQA, MLP 8/3 of the hidden size,
head ~ a quarter of the block compute) at a tenth of its width, with a word-level tokenizer
of its own:

    python benchmarks/lm_prune.py --prune every:3 --from-layer 3
    python benchmarks/lm_prune.py --backbone smollm2 --prune every:3 --from-layer 10 \
        --max-length 128 --batch 8 --steps 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from clients.train import local_train
from fedtune.config import load_config
from fedtune.models import backbone_for
from fedtune.models.layer_pruning import PUBLIC_TEXTS
from fedtune.models.pruning_setup import resolve_config
from fedtune.privacy import DPHistory
from fedtune.runtime.torch_setup import configure_torch
from fedtune.task.lm import NextTokenLoss, lm_targets
from fedtune.tuning import build_tuned_model
from fedtune.tuning.prefix_cache import training_view

# The tiny default: SmolLM2-135M's proportions (30 x 576, MLP 1536, 9 heads / 3 KV heads,
# vocabulary 49,152 tied) scaled to 12 blocks of width 96 and 4,096 words.
TINY = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=12,
            num_attention_heads=6, num_key_value_heads=2, vocab_size=4096,
            max_position_embeddings=512, tie_word_embeddings=True)


def tiny_folder(root: Path) -> str:
    """A random SmolLM2-shaped Llama and a word-level tokenizer (the public texts' words +
    fillers) saved to `root`: what `model.backbone` takes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = sorted({w for text in PUBLIC_TEXTS for w in text.split()})
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = specials + words
    vocab += [f"w{i}" for i in range(TINY["vocab_size"] - len(vocab))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(pad_token_id=0, bos_token_id=2,
                                                         eos_token_id=3, **TINY))
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def _data(n: int, seq: int, vocab: int) -> TensorDataset:
    """Random token rows with a ragged right padding (a quarter of each row at most)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (n, seq), generator=g)
    lengths = torch.randint(seq - seq // 4, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq) < lengths[:, None]).long()
    ids[mask == 0] = 0
    labels = torch.from_numpy(lm_targets(ids.numpy(), mask.numpy())).long()
    return TensorDataset(ids, mask, labels)


def _train_flops(model: torch.nn.Module, data: TensorDataset, cfg) -> float:
    """Forward + backward FLOPs of one example, from the cache where the variant uses it."""
    one = TensorDataset(*(t[:1] for t in data.tensors))
    view = training_view(model, one, cfg)
    forward, rows = view if view is not None else (model, one)
    first, mask, labels = rows.tensors
    counter = FlopCounterMode(display=False)
    with counter:
        NextTokenLoss()(forward(first, mask), labels).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="", help="model.backbone (default: tiny)")
    parser.add_argument("--prune", default="every:3", help="model.prune_layers value")
    parser.add_argument("--from-layer", type=int, default=0,
                        help="also time each model with tuning.lora.from_layer = this "
                             "(counted in the pruned model's blocks for the pruned one)")
    parser.add_argument("--steps", type=int, default=3, help="DP steps per timed round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--no-dp", action="store_true", help="plain steps, no DP-SGD")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a client worker on one core, and CPU time "
                             "without the spin-waits of threads competing for cores)")
    args = parser.parse_args()
    configure_torch(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = args.backbone or tiny_folder(Path(tmp) / "tiny")
        run(args, backbone, Path(tmp))


def run(args: argparse.Namespace, backbone: str, tmp: Path) -> None:
    common = [f'model.backbone="{backbone}"', "task.kind=causal_lm", "data.partition=iid",
              "tuning.method=lora", f"model.max_length={args.max_length}",
              f"train.batch_size={args.batch}", f"train.local_steps={args.steps}",
              f"privacy.sample.enabled={'false' if args.no_dp else 'true'}",
              "privacy.reproducible_noise=true",  # the same batches for every variant
              f'runtime.cache_dir="{tmp / "cache"}"']
    prunes = {"full": "[]", "pruned": f'"{args.prune}"'}
    variants = {}
    for label, prune in prunes.items():
        for from_layer in sorted({0, args.from_layer}):
            cfg = resolve_config(load_config(None, [*common, f"model.prune_layers={prune}",
                                                    f"tuning.lora.from_layer={from_layer}"]))
            loaded = backbone_for(cfg.model, kind="causal_lm")
            name = label + (f"+from{from_layer}" if from_layer else "")
            variants[name] = (cfg, build_tuned_model(loaded, cfg.tuning, 0, seed=0,
                                                     kind="causal_lm"), loaded)
    full = variants["full"][2]
    total = len(full.layers_kept)
    kept = variants["pruned"][2].layers_kept
    share = 1 - len(kept) / total
    vocab = full.model.get_input_embeddings().num_embeddings
    data = _data(10 * args.batch, args.max_length, vocab)  # q = 1/10: expected batch --batch
    print(f"backbone {backbone if args.backbone else 'tiny ' + str(TINY)}\n"
          f"torch threads {torch.get_num_threads()}, prune {args.prune!r}: kept "
          f"{list(kept)} of {total} blocks ({share:.0%} removed"
          f"{'' if share >= 0.3 else ', BELOW the goal of 30 %'}), {args.steps} "
          f"{'plain' if args.no_dp else 'DP'} steps x {args.repeats} repeats, batch "
          f"{args.batch} x {args.max_length} tokens")
    fill = {}
    for name, (cfg, model, _) in variants.items():  # warm-up (fills the prefix cache)
        start = time.process_time()
        local_train(model, data, cfg, DPHistory(), seed=0)
        fill[name] = time.process_time() - start
    # Per repeat, every variant trains the same Poisson batches (reproducible sampling from
    # the repeat's seed): the rounds compare on the same examples. The figure is a round's
    # CPU time (fixed costs included: they are the worker's too) per example trained.
    per_example: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            cfg, model, _ = variants[name]
            start = time.process_time()
            result = local_train(model, data, cfg, DPHistory(), seed=rep + 1)
            per_example[name].append((time.process_time() - start)
                                     / max(result.examples_seen, 1))
    base = statistics.median(per_example["full"])
    base_flops = _train_flops(variants["full"][1], data, variants["full"][0])
    for name, (cfg, model, loaded) in variants.items():
        cpu = statistics.median(per_example[name])
        paired = [f / v for f, v in zip(per_example["full"], per_example[name], strict=True)]
        flops = _train_flops(model, data, cfg)
        print(f"{name:14s} blocks {len(loaded.layers_kept):2d}  CPU-s/step "
              f"{cpu * args.batch:7.3f} (per example {cpu * 1e3:.1f} ms)  speed-up "
              f"{base / cpu:5.2f}x (paired {', '.join(f'{r:.2f}' for r in paired)})  "
              f"FLOPs/example {flops / 1e9:7.2f} G ({base_flops / flops:.2f}x)  first round "
              f"{fill[name]:.1f} CPU-s")
    print(f"process CPU time; load average at the end {np.round(_loadavg(), 2).tolist()}")


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


if __name__ == "__main__":
    main()
