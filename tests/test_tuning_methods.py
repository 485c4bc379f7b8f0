"""LoRA (peft) and BitFit: the right tensors train, DP-SGD works, the shared backbone stays."""

import pytest
import torch

from fedtune.config import ConfigError, ExperimentConfig
from fedtune.models import load_backbone
from fedtune.tuning import available_methods, build_tuned_model


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("minilm")


def _model(backbone, method, seed=0, **settings):
    cfg = ExperimentConfig().tuning
    cfg.method = method
    for key, value in settings.items():  # the method's [tuning.<method>] table
        setattr(cfg.settings(method), key, value)
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
    with pytest.raises(ConfigError, match=r"tuning.lora.targets=\['nope'\]"):
        _model(backbone, "lora", targets=["nope"])


def test_bitfit_trains_only_biases_and_head(backbone):
    model = _model(backbone, "bitfit")
    names = list(model.trainable_state())
    assert names[-2:] == ["head.net.0.weight", "head.net.0.bias"]
    assert all(n.endswith(".bias") for n in names[:-2])
    assert len(names) > 50


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_dp_step_changes_only_the_copy(backbone, method, dp_step):
    shared = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    model = _model(backbone, method)
    before = {n: t.detach().clone() for n, t in model.trainable_state().items()}
    dp_step(model)
    after = model.trainable_state()
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(p, shared[n]) for n, p in backbone.model.named_parameters())


@pytest.mark.parametrize("position", ["output", "attention", "intermediate"])
def test_slash_trains_one_vector_and_starts_as_the_backbone(backbone, position):
    model = _model(backbone, "slash", size=64, position=position)
    assert list(model.trainable_state()) == ["z.embedding.weight", "head.net.0.weight",
                                             "head.net.0.bias"]
    assert model.num_trainable() == 64 + 2 * 384 + 2
    # Projections are buffers regenerated from the seed, not state that is sent.
    again = _model(backbone, "slash", size=64, position=position)
    assert torch.equal(model.proj_0, again.proj_0)
    assert model.proj_0.std().item() == pytest.approx(64**-0.5, rel=0.1)
    ids = torch.randint(1000, 2000, (2, 8))
    mask = torch.ones_like(ids)
    base = backbone.model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.eval()
    with torch.no_grad():
        model.z.embedding.weight.normal_()
        shifted = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    # Hooks live only inside forward: the shared backbone is unchanged afterwards.
    assert torch.allclose(shifted, base)
    with torch.no_grad():
        hidden = {}
        handle = model.head.register_forward_hook(lambda m, i, o: hidden.update(x=i[0]))
        model(ids, mask)
        handle.remove()
    assert not torch.allclose(hidden["x"], torch.nn.functional.layer_norm(
        base.mean(1), (384,)), atol=1e-3)


def test_slash_dp_step_updates_z(backbone, dp_step):
    model = _model(backbone, "slash", size=64)
    dp_step(model)
    assert torch.count_nonzero(model.z.embedding.weight) > 0


def test_lora_run_folder_gets_a_peft_adapter(tmp_path, backbone):
    import copy

    from peft import PeftModel

    from fedtune.config import load_config
    from fedtune.run.export import save_tuned_state
    from fedtune.task.task import get_task

    cfg = load_config(None, ["tuning.method=lora", "model.max_length=32"])
    task = get_task(cfg)
    vector = task.initial_vector() + 0.01
    save_tuned_state(tmp_path, task.new_model(), task.spec, task.spec.unflatten(vector),
                     task.label_names)
    assert (tmp_path / "final_state.safetensors").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(backbone.model), str(tmp_path / "adapter"))
    name = "base_model.model.encoder.layer.0.attention.self.query.lora_B.default.weight"
    expected = task.spec.unflatten(vector)["backbone." + name]
    assert torch.allclose(loaded.get_parameter(name), expected)
