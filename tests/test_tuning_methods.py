"""LoRA (peft) and BitFit: the right tensors train, DP-SGD works, the shared backbone stays."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedtune.config import ConfigError, ExperimentConfig, SampleDPConfig
from fedtune.models import load_backbone
from fedtune.privacy import make_private
from fedtune.tuning import available_methods, build_tuned_model


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("minilm")


def _model(backbone, method, seed=0, **tuning):
    cfg = ExperimentConfig().tuning
    cfg.method = method
    for key, value in tuning.items():
        setattr(cfg, key, value)
    return build_tuned_model(backbone, cfg, num_labels=2, seed=seed)


def test_registry_lists_all_methods():
    assert {"prompt", "lora", "bitfit"} <= set(available_methods())


def test_lora_trains_only_adapters_and_head(backbone):
    model = _model(backbone, "lora")
    names = list(model.trainable_state())
    assert names[-2:] == ["head.net.0.weight", "head.net.0.bias"]
    adapters = names[:-2]
    assert len(adapters) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    assert all("lora_" in n and (".query." in n or ".value." in n) for n in adapters)
    assert model.num_trainable() == 6 * 2 * (8 * 384 * 2) + 2 * 384 + 2
    # Seeded: every process builds the same adapters.
    again = _model(backbone, "lora")
    assert all(torch.equal(a, b) for a, b in
               zip(model.trainable_state().values(), again.trainable_state().values(),
                   strict=True))


def test_lora_bad_target_is_a_config_error(backbone):
    with pytest.raises(ConfigError, match=r"tuning.lora_targets=\['nope'\]"):
        _model(backbone, "lora", lora_targets=["nope"])


def test_bitfit_trains_only_biases_and_head(backbone):
    model = _model(backbone, "bitfit")
    names = list(model.trainable_state())
    assert names[-2:] == ["head.net.0.weight", "head.net.0.bias"]
    assert all(n.endswith(".bias") for n in names[:-2])
    assert len(names) > 50


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_dp_step_changes_only_the_copy(backbone, method):
    shared = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    model = _model(backbone, method)
    before = {n: t.detach().clone() for n, t in model.trainable_state().items()}
    ids = torch.randint(1000, 2000, (16, 8))
    data = TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (16,)))
    params = [p for p in model.parameters() if p.requires_grad]
    private = make_private(model, torch.optim.SGD(params, lr=0.5), DataLoader(data, batch_size=8),
                           SampleDPConfig(), 1.0, seed=0)
    try:
        for x, m, y in private.loader:
            if y.numel():
                private.optimizer.zero_grad()
                private.criterion(private.model(x, m), y).backward()
                private.optimizer.step()
                break
    finally:
        private.close()
    after = model.trainable_state()
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(p, shared[n]) for n, p in backbone.model.named_parameters())
