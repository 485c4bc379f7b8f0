"""The soft-prompt method: only prompt + head train, Opacus computes per-sample grads."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedtune.config import ExperimentConfig, SampleDPConfig
from fedtune.models import load_backbone
from fedtune.privacy import make_private
from fedtune.tuning import available_methods, build_tuned_model


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("minilm")


def _model(backbone, length=4, seed=0):
    cfg = ExperimentConfig().tuning
    cfg.prompt.length = length
    return build_tuned_model(backbone, cfg, num_labels=2, seed=seed)


def test_only_prompt_and_head_are_trainable(backbone):
    model = _model(backbone)
    names = list(model.trainable_state())
    assert names == ["prompt.embedding.weight", "head.net.0.weight", "head.net.0.bias"]
    assert model.num_trainable() == 4 * 384 + 2 * 384 + 2
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert "prompt" in available_methods()


def test_prompt_starts_from_sep_after_cls_and_head_starts_at_zero(backbone):
    a, b = _model(backbone, seed=1), _model(backbone, seed=1)
    assert torch.equal(a.prompt.embedding.weight, b.prompt.embedding.weight)
    sep = backbone.model.get_input_embeddings().weight[backbone.tokenizer.sep_token_id]
    assert torch.equal(a.prompt.embedding.weight, sep.expand(4, -1))
    assert a.insert_at == 1
    ids = torch.randint(1000, 2000, (3, 8))
    logits = a(ids, torch.ones_like(ids))
    assert logits.shape == (3, 2) and torch.count_nonzero(logits) == 0


def test_padding_does_not_change_the_prediction(backbone):
    model = _model(backbone)
    torch.nn.init.normal_(model.head.net[0].weight)
    ids = torch.randint(1000, 2000, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    model.eval()
    assert torch.allclose(model(ids, torch.ones_like(ids)), model(padded, mask), atol=1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_step_updates_only_trainable_tensors(backbone, mode, dp_step):
    model = _model(backbone)
    frozen_before = backbone.model.embeddings.word_embeddings.weight.clone()
    prompt_before = model.prompt.embedding.weight.detach().clone()
    dp_step(model, grad_sample_mode=mode, lr=0.1)
    assert not torch.equal(model.prompt.embedding.weight, prompt_before)
    assert torch.equal(backbone.model.embeddings.word_embeddings.weight, frozen_before)


def test_empty_poisson_batch_is_a_noised_accounted_step(backbone):
    from clients.train import _empty_batch_step

    model = _model(backbone)
    ids = torch.randint(1000, 2000, (8, 8))
    data = TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (8,)))
    params = [p for p in model.parameters() if p.requires_grad]
    private = make_private(model, torch.optim.SGD(params, lr=0.1), DataLoader(data, batch_size=4),
                           SampleDPConfig(), 1.0, reproducible_seed=0)
    before = model.head.net[0].weight.detach().clone()
    try:
        private.optimizer.zero_grad()
        _empty_batch_step(private.optimizer, model, "hooks")
    finally:
        private.close()
    assert not torch.equal(model.head.net[0].weight, before)  # noise was added
    assert private.engine.accountant.history == [(1.0, 0.5, 1)]  # and the step counted
