"""The CUDA path of a GPU worker: one client's local training, plain and with DP-SGD, on
the GPU against the CPU, with the same model, batches and seed.

For each method it prints the largest difference between the CUDA and CPU deltas of the
plain run (float tolerance: TF32 is off), that the DP-SGD run on CUDA gives a finite delta
and an epsilon, and ms per step on each device. Without a CUDA device it runs the CPU half
and says so.

    python benchmarks/gpu_check.py [--methods prompt lora] [--random-weights DIR]

`--random-weights DIR` builds the backbone from the config and tokenizer in DIR with random
weights (for a machine without the bundled MiniLM package): the check is about devices,
not accuracy. Messages are random token ids, so nothing here needs the corpus.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from clients.train import local_train
from fedtune.config import ExperimentConfig
from fedtune.models import load_backbone
from fedtune.privacy import DPHistory, calibrate_noise
from fedtune.tuning import build_tuned_model

SEQ, EXAMPLES, STEPS = 64, 256, 6


def _random_backbone(folder: Path) -> str:
    from transformers import AutoConfig, AutoModel

    out = Path(tempfile.mkdtemp(prefix="gpu-check-backbone-"))
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(out)
    for item in folder.iterdir():
        if item.name != "config.json" and item.is_file():
            shutil.copy(item, out / item.name)
    return str(out)


def _data(vocab: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (EXAMPLES, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[EXAMPLES // 2:, SEQ // 2:] = 0
    labels = torch.randint(0, 2, (EXAMPLES,), generator=gen)
    return TensorDataset(ids, mask, labels)


def _flat(model: torch.nn.Module) -> np.ndarray:
    # fedtune.wire.delta would do, but it imports Flower, which a bare GPU box may not have.
    return torch.cat([t.detach().float().cpu().reshape(-1)
                      for t in model.trainable_state().values()]).numpy()


def _train(backbone, cfg: ExperimentConfig, data: TensorDataset, device: str,
           warm_up: bool = True) -> tuple[np.ndarray, float, float | None]:
    """(delta, ms per step, epsilon) of one local round on `device` (noise calibration and
    accounting included); with `warm_up`, an untimed round goes first."""
    backbone.model.to(device)
    for timed in ((False, True) if warm_up else (True,)):
        model = build_tuned_model(backbone, cfg.tuning, 2, seed=0).to(device)
        before = _flat(model)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = local_train(model, data, cfg, DPHistory(), seed=1)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if timed:
            delta = _flat(model) - before
            return delta, 1000 * elapsed / result.steps, result.epsilon
    raise AssertionError("unreachable")


def check(method: str, backbone, data: TensorDataset, cuda: bool) -> dict:
    cfg = ExperimentConfig()
    cfg.tuning.method = method
    cfg.train.local_steps, cfg.train.batch_size = STEPS, 32
    cfg.privacy.sample.enabled = False
    row: dict = {"method": method}
    plain_cpu, row["cpu_ms_per_step"], _ = _train(backbone, cfg, data, "cpu")
    if not cuda:
        return row
    plain_gpu, row["cuda_ms_per_step"], _ = _train(backbone, cfg, data, "cuda")
    row["max_abs_diff"] = float(np.max(np.abs(plain_gpu - plain_cpu)))
    row["rel_diff"] = float(np.linalg.norm(plain_gpu - plain_cpu) / np.linalg.norm(plain_cpu))
    cfg.privacy.sample.enabled = True
    calibrate_noise.cache_clear()  # time the whole round a client pays the first time
    dp_gpu, row["cuda_dp_ms_per_step_first_round"], row["cuda_dp_epsilon"] = _train(
        backbone, cfg, data, "cuda", warm_up=False)
    _, row["cuda_dp_ms_per_step"], _ = _train(backbone, cfg, data, "cuda")
    row["cuda_dp_delta_finite"] = bool(np.isfinite(dp_gpu).all())
    row["cuda_dp_delta_norm"] = float(np.linalg.norm(dp_gpu))
    backbone.model.to("cpu")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["prompt", "lora"])
    parser.add_argument("--random-weights", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = _random_backbone(args.random_weights) if args.random_weights else "minilm"
    backbone = load_backbone(name)
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, cuda: "
          f"{torch.cuda.get_device_name(0) if cuda else 'none (CPU half only)'}, "
          f"cpu threads {torch.get_num_threads()}")
    data = _data(backbone.tokenizer.vocab_size)
    for method in args.methods:
        print(json.dumps(check(method, backbone, data, cuda)), flush=True)


if __name__ == "__main__":
    main()
