"""Steps without DP-SGD clip the batch gradient to `train.max_grad_norm`: `train.lr` is tuned
for DP-SGD, whose per-example clipping bounds each step, and the same rate on unclipped
gradients threw a pruned LoRA run off in its first round (benchmarks/RESULTS.md). DP-SGD
steps are left to Opacus' clipping."""

import pytest
import torch
from torch.utils.data import TensorDataset

from clients.train import local_train
from fedtune.config import ConfigError, load_config
from fedtune.privacy import DPHistory
from fedtune.tuning import build_tuned_model

PLAIN = ["tuning.prompt.length=4", "train.batch_size=8", "train.local_steps=1",
         "train.optimizer=sgd", "train.lr=0.5", "privacy.sample.enabled=false"]




def _update(backbone, sets: list[str]) -> torch.Tensor:
    cfg = load_config(None, sets)
    model = build_tuned_model(backbone, cfg.tuning, 2, seed=cfg.seed)
    start = torch.cat([t.detach().flatten().clone() for t in model.trainable_state().values()])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2900, (24, 12), generator=g)
    data = TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (24,), generator=g))
    local_train(model, data, cfg, DPHistory(), seed=5)
    end = torch.cat([t.detach().flatten() for t in model.trainable_state().values()])
    return end - start


def test_a_plain_step_moves_at_most_lr_times_the_clip_norm(tiny_backbone):
    clip = 1e-3
    clipped = float(_update(tiny_backbone, [*PLAIN, f"train.max_grad_norm={clip}"]).norm())
    unclipped = float(_update(tiny_backbone, [*PLAIN, "train.max_grad_norm=0"]).norm())
    # Every parameter group's rate is at most train.lr (the head's; the prompt's is scaled
    # down), so one SGD step on a gradient of norm <= clip moves the tensors <= lr * clip.
    assert 0 < clipped <= 0.5 * clip * (1 + 1e-5), clipped
    assert unclipped > 10 * clipped, (unclipped, clipped)


def test_dp_sgd_steps_are_not_clipped_a_second_time(tiny_backbone):
    dp = [*PLAIN[:-1], "privacy.sample.enabled=true", "privacy.reproducible_noise=true",
          "privacy.sample.noise_multiplier=1.0", "privacy.sample.target_epsilon=1000"]
    tight = _update(tiny_backbone, [*dp, "train.max_grad_norm=1e-6"])
    off = _update(tiny_backbone, [*dp, "train.max_grad_norm=0"])
    assert torch.equal(tight, off)


def test_a_negative_clip_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="train.max_grad_norm"):
        load_config(None, ["train.max_grad_norm=-1"])
