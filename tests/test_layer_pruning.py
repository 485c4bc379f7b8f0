"""`[model] prune_layers`: rules resolve to layer lists, bad settings are one-line errors,
every family loses exactly the named blocks (its forward is the unpruned one with those
blocks skipped), every method trains a DP step on a pruned backbone, the hashes bind the
pruning, a split cut counts pruned layers, and export/predict rebuild the same pruning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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

from fedtune.config import ConfigError, config_from_toml, load_config
from fedtune.models import backbone_for, load_backbone
from fedtune.models.backbone import resolve_backbone_path
from fedtune.models.families import derive_structure
from fedtune.models.layer_pruning import available_rules, layer_importance
from fedtune.models.pruning_setup import pruning_record, resolve_config
from fedtune.split.cut import SplitBackbone, SplitError
from fedtune.task.task import model_spec
from fedtune.tuning import build_tuned_model
from fedtune.wire.protocol import ProtocolError, TrainInstruction

LAYERS = 4
SMALL = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
             intermediate_size=48, max_position_embeddings=64)
CONFIGS = {
    "bert": lambda v: BertConfig(vocab_size=v, **SMALL),
    "roberta": lambda v: RobertaConfig(vocab_size=v, pad_token_id=0, **SMALL),
    "distilbert": lambda v: DistilBertConfig(vocab_size=v, dim=32, n_layers=LAYERS, n_heads=2,
                                             hidden_dim=48, max_position_embeddings=64),
    "mpnet": lambda v: MPNetConfig(vocab_size=v, pad_token_id=0, **SMALL),
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=32, n_layer=LAYERS, n_head=2,
                                 n_positions=64, bos_token_id=0, eos_token_id=0,
                                 pad_token_id=0),
    "llama": lambda v: LlamaConfig(vocab_size=v, num_key_value_heads=1, pad_token_id=0,
                                   bos_token_id=0, eos_token_id=0, **SMALL),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family as a 4-layer random model folder with the packaged MiniLM tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    root = tmp_path_factory.mktemp("prune")
    out = {}
    for family, make in CONFIGS.items():
        torch.manual_seed(0)
        AutoModel.from_config(make(len(tokenizer))).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = str(root / family)
    return out


def _cfg(folder: str, *sets: str):
    return load_config(None, [f'model.backbone="{folder}"', "tuning.prompt.length=2",
                              "tuning.slash.size=8", "privacy.reproducible_noise=true",
                              *sets])


def _tokens(n: int = 3, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 2000, (n, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, seq - 2:] = 0  # a padded row: the family's mask form is exercised
    return ids, mask


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("value, expected", [
    ("[]", []), ("[4, 5]", [4, 5]), ('"every:3"', "every:3"), ("every:3", "every:3"),
    ('"importance:2"', "importance:2"), ('"top:1"', "top:1")])
def test_settings_that_load_and_round_trip(value, expected):
    cfg = load_config(None, [f"model.prune_layers={value}"])
    assert cfg.model.prune_layers == expected
    assert config_from_toml(cfg.to_toml()).model.prune_layers == expected


@pytest.mark.parametrize("value, message", [
    ('"sometimes:2"', "model.prune_layers='sometimes:2': unknown rule 'sometimes'; rules: "
                      "every, importance, top"),
    ('"every:0"', "model.prune_layers='every:0': k must be >= 1, got 0"),
    ('"every"', "model.prune_layers='every' is neither a list of layer indices nor a rule "
                "'<rule>:<k>' with rule one of: every, importance, top"),
    ("[1, 1]", "model.prune_layers=[1, 1]: layer [1] listed more than once"),
    ("[-1]", "model.prune_layers=[-1]: layer indices must be >= 0, got [-1]"),
    ("3", "model.prune_layers must be a list or a string, got 3"),
    ('[1, "2"]', "model.prune_layers[1] must be an integer, got '2'"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(value, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.prune_layers={value}"])
    assert str(err.value) == message


@pytest.mark.parametrize("value, message", [
    ((4,), r"^model.prune_layers=\[4\]: index \[4\] out of range for this backbone's 4 "
           r"layers \(allowed 0..3\)$"),
    ((0, 1, 2, 3), r"^model.prune_layers=\[0, 1, 2, 3\] drops all 4 layers of this backbone; "
                   r"at least one must stay$"),
    ("every:1", r"^model.prune_layers='every:1' drops all 4 layers"),
    ("top:9", r"^model.prune_layers='top:9' drops all 4 layers"),
    ("importance:4", r"^model.prune_layers='importance:4' drops all 4 layers"),
])
def test_what_needs_the_layer_count_fails_at_load(value, message, folders):
    with pytest.raises(ConfigError, match=message):
        load_backbone(folders["bert"], value)


# ------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("rule, kept", [
    ("every:2", (0, 2)), ("every:3", (1, 2)), ("every:9", (0, 1, 2)), ("top:2", (0, 1))])
def test_positional_rules(rule, kept, folders):
    assert load_backbone(folders["bert"], rule).layers_kept == kept


def test_importance_drops_the_layers_whose_skipping_changes_the_pooled_output_least(folders):
    full = load_backbone(folders["bert"])
    scores = layer_importance(full.model, full.tokenizer)
    assert len(scores) == LAYERS and all(s >= 0 for s in scores) and len(set(scores)) == LAYERS
    least = sorted(range(LAYERS), key=scores.__getitem__)[:2]
    pruned = load_backbone(folders["bert"], "importance:2")
    assert pruned.layers_kept == tuple(i for i in range(LAYERS) if i not in least)
    # The score is of the model alone: recomputed, the same (every process agrees).
    assert layer_importance(full.model, full.tokenizer) == scores


def test_a_run_resolves_its_rule_once_into_the_list_its_config_records(folders):
    cfg = _cfg(folders["bert"], 'model.prune_layers="every:2"')
    resolved = resolve_config(cfg)
    assert resolved.model.prune_layers == [1, 3] and cfg.model.prune_layers == "every:2"
    again = config_from_toml(resolved.to_toml())
    assert backbone_for(again.model).hash == load_backbone(folders["bert"], "every:2").hash
    assert resolve_config(resolved) is resolved  # an explicit list stays as it is


def test_rules_live_in_a_registry():
    assert available_rules() == ["every", "importance", "top"]


# ---------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", list(CONFIGS))
def test_each_family_loses_the_named_blocks_and_forwards_as_if_they_were_skipped(
        family, folders):
    full = load_backbone(folders[family])
    pruned = load_backbone(folders[family], (1, 2))
    assert pruned.layers_kept == (0, 3) and full.layers_kept == (0, 1, 2, 3)
    assert len(derive_structure(pruned.model).layers) == 2
    assert pruned.model.config.num_hidden_layers == 2
    assert pruned.num_params < full.num_params
    # Decoders index their KV cache by layer_idx: renumbered to the new positions.
    for new_idx, block in enumerate(derive_structure(pruned.model).layers):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == new_idx
    ids, mask = _tokens()
    got = pruned.model(input_ids=ids, attention_mask=mask).last_hidden_state
    # Reference: the unpruned model with blocks 1 and 2 made the identity.
    def identity(_m, args, kwargs, output):
        hidden = args[0] if args else next(kwargs[k] for k in ("hidden_states", "hidden_state",
                                                               "x") if k in kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    layers = derive_structure(full.model).layers
    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in (1, 2)]
    try:
        want = full.model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_process_cache_is_keyed_by_the_pruning(folders):
    full = load_backbone(folders["bert"])
    assert load_backbone(folders["bert"], (3,)) is load_backbone(folders["bert"], (3,))
    assert load_backbone(folders["bert"], (3,)) is not full
    assert len(derive_structure(full.model).layers) == LAYERS  # untouched by the pruned load


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", ["prompt", "lora", "slash", "bitfit"])
def test_every_method_builds_and_takes_a_dp_step_on_a_pruned_backbone(method, folders,
                                                                      dp_step):
    cfg = _cfg(folders["bert"], f"tuning.method={method}", "model.prune_layers=[0, 2]")
    backbone = backbone_for(cfg.model)
    model = build_tuned_model(backbone, cfg.tuning, 2, seed=0)
    before = {k: v.clone() for k, v in model.trainable_state().items()}
    dp_step(model)
    after = model.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert len(derive_structure(backbone.model).layers) == 2


def test_the_hashes_bind_the_pruning_so_a_delta_of_another_pruning_is_rejected(
        folders, task_identity):
    cfg = _cfg(folders["bert"])
    full, pruned = load_backbone(folders["bert"]), load_backbone(folders["bert"], (3,))
    other = load_backbone(folders["bert"], (2,))
    assert len({full.hash, pruned.hash, other.hash}) == 3
    specs = [model_spec(build_tuned_model(b, cfg.tuning, 2, seed=0), b, cfg, 2)
             for b in (full, pruned)]
    # A prompt's tensors have the same layout either way: only the backbone hash differs.
    assert specs[0].shapes == specs[1].shapes and specs[0].hash != specs[1].hash
    for sent, local in (specs, specs[::-1]):
        message = TrainInstruction(np.zeros(sent.size, np.float32), 1, 0.1, sent.hash
                                   ).to_record()
        with pytest.raises(ProtocolError, match="runs another backbone"):
            TrainInstruction.from_record(message, local)


def test_an_unpruned_backbone_hashes_as_before(folders):
    """Existing run folders and exports stay loadable: no pruning, no change of hash."""
    from fedtune.models.backbone import _weights_hash

    full = load_backbone(folders["bert"])
    assert full.hash == _weights_hash(AutoModel.from_pretrained(folders["bert"]))


# ------------------------------------------------------------------------------- split


def test_a_split_cut_counts_the_pruned_layers(folders):
    pruned = load_backbone(folders["bert"], (0, 1))  # keeps original 2 and 3
    split = SplitBackbone(pruned.model, 1)
    ids, mask = _tokens()
    embeds = pruned.model.get_input_embeddings()(ids)
    out = split.body(split.head(split.embed(embeds, mask), mask), mask)
    reference = pruned.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    with pytest.raises(SplitError, match=r"^split.cut_layer=2 is out of range for this "
                                         r"backbone \(2 layers after model.prune_layers\): "
                                         r"allowed 0..1"):
        SplitBackbone(pruned.model, 2)
    SplitBackbone(load_backbone(folders["bert"]).model, 2)  # fine on the unpruned one


# ----------------------------------------------------------------------- ledger, export


def test_the_ledger_record_is_the_servers_own_count(folders):
    full = pruning_record(load_backbone(folders["llama"]), 16)
    half = pruning_record(load_backbone(folders["llama"], (0, 3)), 16)
    assert full["layers_kept"] == [0, 1, 2, 3] and half["layers_kept"] == [1, 2]
    assert 0 < half["backbone_flops_per_example"] < full["backbone_flops_per_example"]
    # Blocks are identical in cost: half of them is half the block FLOPs (no LM head here).
    assert half["backbone_flops_per_example"] == pytest.approx(
        full["backbone_flops_per_example"] / 2, rel=0.02)


def test_export_and_predict_rebuild_the_pruning_of_the_run(folders, tmp_path):
    from fedtune.run.export import ExportError, export_run, load_tuned, save_tuned_state
    from fedtune.run.ledger import CONFIG_FILE

    cfg = _cfg(folders["bert"], "model.prune_layers=[1]", "model.max_length=16")
    backbone = backbone_for(cfg.model)
    model = build_tuned_model(backbone, cfg.tuning, 2, seed=cfg.seed)
    spec = model_spec(model, backbone, cfg, 2)
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(cfg.to_toml())
    state = {k: torch.randn_like(v) for k, v in model.trainable_state().items()}
    save_tuned_state(run, model, spec, state, ("ham", "spam"))
    tuned = load_tuned(export_run(run, tmp_path / "export"))
    assert len(derive_structure(tuned.model.backbone).layers) == 3
    assert tuned.spec.hash == spec.hash
    assert tuned.predict_proba(["hello there", "win money now"]).shape == (2, 2)
    # The same tensors under an unpruned config are another model: refused.
    (run / CONFIG_FILE).write_text(_cfg(folders["bert"], "model.max_length=16").to_toml())
    with pytest.raises(ExportError, match="not the same backbone"):
        load_tuned(run)


def test_client_flops_follow_the_pruning_in_one_process(folders):
    # The per-process FLOPs memo was keyed by method, trainable size and sequence length:
    # a pruned and an unpruned prompt model shared an entry, and the second reported the
    # first's FLOPs.
    from torch.utils.data import TensorDataset

    from clients.train import flops_per_example

    ids, mask = _tokens(1, 7)
    data = TensorDataset(ids, mask, torch.zeros(1, dtype=torch.int64))
    flops = {}
    for prune in ((), (1, 2)):
        cfg = _cfg(folders["bert"], f"model.prune_layers={list(prune)}")
        model = build_tuned_model(backbone_for(cfg.model), cfg.tuning, 2, seed=0)
        flops[prune] = flops_per_example(model, data)
    assert flops[(1, 2)] < 0.75 * flops[()]
