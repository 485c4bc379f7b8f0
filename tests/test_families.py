"""Any reasonable backbone: tiny random BERT, RoBERTa, DistilBERT, MPNet, GPT-2 and Llama
models (built offline from a config, saved to a folder, loaded like a user's model) get
their structure derived, train with every tuning method (DP-SGD for prompt and LoRA),
produce a delta and evaluate, and split mode cuts them and trains through the
client/server path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from torch.utils.data import TensorDataset
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    MPNetConfig,
    RobertaConfig,
)

from clients import split as split_client
from clients.train import local_train
from fedtune.config import ConfigError, load_config
from fedtune.models import backbone_from_model, load_backbone
from fedtune.models.backbone import resolve_backbone_path
from fedtune.models.families import derive_structure, resolve_lora_targets
from fedtune.privacy import DPHistory
from fedtune.split.cut import SplitBackbone, SplitError
from fedtune.task.evaluation import evaluate
from fedtune.task.task import Split, model_spec
from fedtune.tuning import build_tuned_model

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=48, max_position_embeddings=64)
CONFIGS = {
    "bert": lambda v: BertConfig(vocab_size=v, **SMALL),
    "roberta": lambda v: RobertaConfig(vocab_size=v, pad_token_id=0, **SMALL),
    "distilbert": lambda v: DistilBertConfig(vocab_size=v, dim=32, n_layers=2, n_heads=2,
                                             hidden_dim=48, max_position_embeddings=64),
    "mpnet": lambda v: MPNetConfig(vocab_size=v, pad_token_id=0, **SMALL),
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=2,
                                 n_positions=64, bos_token_id=0, eos_token_id=0,
                                 pad_token_id=0),
    # Bias-free, grouped KV heads, as Llama checkpoints are.
    "llama": lambda v: LlamaConfig(vocab_size=v, num_key_value_heads=1, pad_token_id=0,
                                   bos_token_id=0, eos_token_id=0, **SMALL),
}
FAMILIES = list(CONFIGS)
# What the structure must yield: LoRA's default targets, every attention projection.
EXPECTED = {
    "bert": (["query", "value"], ["query", "key", "value", "dense"]),
    "roberta": (["query", "value"], ["query", "key", "value", "dense"]),
    "distilbert": (["q_lin", "v_lin"], ["q_lin", "k_lin", "v_lin", "out_lin"]),
    "mpnet": (["q", "v"], ["q", "k", "v", "o"]),
    "gpt2": (["c_attn"], ["c_attn", "c_proj"]),
    "llama": (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]),
}
SEQ = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family as a user would hand it over: a folder written by save_pretrained
    (random weights, the packaged MiniLM's tokenizer; its [PAD] serves the decoders)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family, make in CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModel.from_config(make(len(tokenizer)))
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = str(root / family)
    return out


def _cfg(folder: str, *sets: str):
    return load_config(None, [f"model.backbone={folder!r}".replace("'", '"'),
                              "train.batch_size=4", "train.local_steps=1",
                              "tuning.prompt.length=2", "tuning.slash.size=8",
                              "privacy.reproducible_noise=true", *sets])


def _data(n: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, SEQ), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[: n // 2, SEQ - 3:] = 0  # padded rows: every mask form gets exercised
    return TensorDataset(ids, mask, torch.randint(0, 2, (n,), generator=g))


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_is_read_from_the_model(family, folders):
    backbone = load_backbone(folders[family])
    structure = derive_structure(backbone.model)
    targets, attention = EXPECTED[family]
    assert len(structure.layers) == 2 and structure.hidden_size == 32
    assert structure.lora_targets() == targets
    assert structure.attention_names() == attention
    assert set(structure.sublayers) == {"attention", "intermediate", "output"}
    # Pre-norm decoders end with a norm the body must apply; post-norm encoders do not.
    assert (structure.final_norm is not None) == (family in ("gpt2", "llama"))
    assert resolve_lora_targets(backbone.model, []) == targets
    # The in-memory builder and the folder loader agree on the frozen weights.
    same = backbone_from_model("x", AutoModel.from_pretrained(folders[family]),
                               backbone.tokenizer)
    assert same.hash == backbone.hash and not any(
        p.requires_grad for p in same.model.parameters())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_causal_lm_task_loads_the_decoder_with_its_lm_head(family, folders):
    """The same folder: the bare decoder for a classifier, the model with its LM head for
    a causal-LM task (whose loss needs the vocabulary logits)."""
    from fedtune.models.backbone import BackboneError

    bare = load_backbone(folders[family])
    lm = load_backbone(folders[family], kind="causal_lm")
    assert not hasattr(bare.model, "lm_head")
    assert lm.model.get_output_embeddings() is not None
    ids = torch.tensor([[5, 6, 7]])
    assert lm.model(input_ids=ids).logits.shape == (1, 3, lm.model.config.vocab_size)
    assert lm.hash != bare.hash
    with pytest.raises(BackboneError, match="task kind 'regression' has no model class"):
        load_backbone(folders[family], kind="regression")


def test_the_bundled_minilm_derives_what_was_hard_coded_for_it():
    """Switching the config default to "derive" leaves MiniLM runs as they were: the same
    LoRA targets and the same SLaSh sub-layers (so the same spec and projections)."""
    structure = derive_structure(load_backbone("minilm").model)
    assert structure.lora_targets() == ["query", "value"]
    assert structure.sublayers == {"attention": "attention.output.dense",
                                   "intermediate": "intermediate.dense",
                                   "output": "output.dense"}
    assert structure.layers_path == "encoder.layer" and len(structure.layers) == 6


def test_lora_targets_the_model_lacks_are_one_line_listing_what_it_has(folders):
    model = load_backbone(folders["mpnet"]).model
    with pytest.raises(ConfigError) as err:
        resolve_lora_targets(model, ["query", "value"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("tuning.lora.targets=['query', 'value']: ['query', 'value'] "
                              "match no module of this mpnet model; its attention "
                              "projections are: q, k, v, o; its other linear layers: dense")
    # A target that matches next to one that does not is refused too, not dropped.
    with pytest.raises(ConfigError, match=r"\['value'\] match no module"):
        resolve_lora_targets(model, ["q", "value"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prompt", "lora", "slash", "bitfit"])
def test_every_method_trains_a_step_gives_a_delta_and_evaluates(family, method, folders):
    if method == "bitfit" and family == "llama":
        pytest.skip("bias-free: see test_bitfit_on_a_bias_free_model_is_refused_in_one_line")
    # DP-SGD (Opacus, hooks) for prompt and LoRA; plain steps for the other two.
    dp = method in ("prompt", "lora")
    cfg = _cfg(folders[family], f"tuning.method={method}", "train.local_steps=2",
               f"privacy.sample.enabled={str(dp).lower()}")
    backbone = load_backbone(folders[family])
    model = build_tuned_model(backbone, cfg.tuning, 2, seed=cfg.seed)
    spec = model_spec(model, backbone, cfg, 2)
    start = spec.flatten(model.trainable_state())
    result = local_train(model, _data(), cfg, DPHistory(), seed=3)
    delta = spec.flatten(model.trainable_state()) - start
    assert result.steps == 2 and np.isfinite(delta).all()
    assert (result.epsilon is not None) == dp
    # Every tensor moved: the head (zero at the start) on step one, the method's own
    # tensors (prompt, adapters, z, biases) from step two on.
    moved = {n for n, t in spec.unflatten(delta).items() if t.abs().sum() > 0}
    assert moved == set(spec.unflatten(delta)), set(spec.unflatten(delta)) - moved
    ids, mask, labels = _data(6, seed=1).tensors
    scores = evaluate(model, Split(ids.numpy(), mask.numpy(), labels.numpy()), batch_size=4)
    assert scores["examples"] == 6 and np.isfinite(scores["loss"])
    # The shared frozen backbone is untouched by every method.
    reference = AutoModel.from_pretrained(folders[family]).state_dict()
    for name, tensor in backbone.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_bitfit_on_a_bias_free_model_is_refused_in_one_line(folders):
    """Llama has no bias terms: BitFit would train the head only, so it is refused."""
    cfg = _cfg(folders["llama"], "tuning.method=bitfit")
    with pytest.raises(ConfigError, match=r"^tuning.method='bitfit': .* has no bias terms"):
        build_tuned_model(load_backbone(folders["llama"]), cfg.tuning, 2, seed=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_then_body_is_the_models_forward_at_every_cut(family, folders):
    model = load_backbone(folders[family]).model
    ids, mask, _ = _data(4).tensors
    embeds = model.get_input_embeddings()(ids)
    reference = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    for cut in range(2):
        split = SplitBackbone(model, cut)
        out = split.body(split.head(split.embed(embeds, mask), mask), mask)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_step_at_cut_1_through_the_client_and_body_service(family, folders):
    """The split client (clients/split.py) with the process body (fedtune/split/body.py),
    under DP-SGD: same deltas as unsplit training, smashed bytes metered."""
    cfg = _cfg(folders[family], "split.enabled=true", "split.cut_layer=1",
               "train.local_steps=2")
    backbone = load_backbone(folders[family])
    data = _data()
    plain = build_tuned_model(backbone, cfg.tuning, 2, seed=cfg.seed)
    local_train(plain, data, cfg, DPHistory(), seed=5)
    model = build_tuned_model(backbone, cfg.tuning, 2, seed=cfg.seed)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    task = type("T", (), {"backbone": backbone, "num_labels": 2})()
    view = split_client.split_view(model, task, cfg, context)
    step = split_client.split_step(view, cfg, 2, n=len(data), seed=5)
    result = local_train(view, data, cfg, DPHistory(), seed=5, step=step)
    assert result.extras["split-steps"] == 2 and result.extras["smashed-bytes-up"] > 0
    assert result.epsilon is not None
    for name, tensor in plain.trainable_state().items():
        torch.testing.assert_close(model.trainable_state()[name], tensor,
                                   rtol=1e-5, atol=1e-6)


def test_split_refuses_an_unsupported_model_in_one_line():
    from transformers import ElectraConfig

    model = AutoModel.from_config(ElectraConfig(vocab_size=100, embedding_size=16, **SMALL))
    with pytest.raises(SplitError) as err:
        SplitBackbone(model, 1)
    assert str(err.value) == (
        "split mode does not know how to cut a 'electra' model; supported families: "
        "bert, distilbert, gpt2, llama, mpnet, roberta")


@pytest.mark.slow
def test_fedtune_run_with_a_tiny_gpt2_folder_in_split_mode(folders, tmp_path):
    """End to end through the Flower simulation: a decoder the package does not bundle,
    given as a folder, trained in split mode under DP-SGD."""
    import json

    from test_e2e_sim import ONE_ACTOR, OVERRIDES, ROOT, _fedtune_run

    sets = [o for o in OVERRIDES if not o.startswith("train.rounds")] + [
        "train.rounds=2", f'model.backbone="{folders["gpt2"]}"', "split.enabled=true",
        "split.cut_layer=1", "privacy.disclose_counts=true",  # it reads the split figures
        # Equal partitions: one noise calibration per process, not one per client size
        # (the calibration, seconds each, is most of what this tiny model's run computes).
        "data.partition=iid", *ONE_ACTOR]
    out = _fedtune_run(ROOT / "experiments/quickstart.toml", tmp_path / "gpt2", sets)
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["clients"] == 2 and not r["failed"] and not r["rejected"]
        assert r["split_steps"] > 0 and r["smashed_bytes_up"] > 0
    backbone = load_backbone(folders["gpt2"])
    assert summary["backbone_params"] == backbone.num_params
    assert summary["method"] == "prompt" and summary["epsilon_sample"] > 0


def test_a_cut_that_does_not_reproduce_the_forward_is_refused(folders, monkeypatch):
    """Blocks run without the captured mask (as after an upgrade that changed what a block
    takes) give other activations at the unpadded positions: refused when built."""
    from fedtune.models.families import LayerInputs

    def without_mask(self, block, hidden):
        return block(hidden)

    monkeypatch.setattr(LayerInputs, "call", without_mask)
    with pytest.raises(SplitError, match=r"^split mode cannot reproduce this 'bert' model's "
                                         r"forward when cut at split.cut_layer=1 .*"
                                         r"supported families: bert, "):
        SplitBackbone(load_backbone(folders["bert"]).model, 1)
