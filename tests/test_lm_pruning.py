"""Layer pruning and LoRA from a layer (the frozen-prefix cache) on a causal LM, on tiny
random Llama and GPT-2 decoders saved to folders (the packaged MiniLM tokenizer stands in
for theirs): a pruned decoder keeps its final norm and LM head and forwards as the unpruned
one with the dropped blocks skipped; every rule resolves to a list on a decoder (the
importance rule reads the next-token distributions); `forward_from` on the prefix states
gives the model's own logits on right- and left-padded batches (masks and rotary positions
as the model's forward makes them); a DP-SGD step from the cache is the uncached step; and
the server's perplexity from the cache is the uncached one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from clients.train import local_train
from fedtune.config import ConfigError, config_from_toml, load_config
from fedtune.models import layer_pruning, load_backbone
from fedtune.models.families import derive_structure
from fedtune.models.layer_pruning import PUBLIC_MAX_TOKENS, layer_importance
from fedtune.models.pruning_setup import resolve_config
from fedtune.privacy import DPHistory
from fedtune.task.evaluation import _measure
from fedtune.task.lm import NextTokenLoss, lm_targets
from fedtune.task.rows import Split
from fedtune.tuning import build_tuned_model
from fedtune.tuning.prefix_cache import cache_applies, skipped_layers, training_view
from tests.lm_fixtures import LM, decoder_configs, write_decoder_folders

LAYERS = 4
CONFIGS = decoder_configs(LAYERS)
FAMILIES = list(CONFIGS)


@pytest.fixture
def few_texts(monkeypatch):
    """The importance rule on 3 of its public texts: each text costs a forward per block
    (the rule reads the module's texts when it runs)."""
    monkeypatch.setattr(layer_pruning, "PUBLIC_TEXTS", layer_pruning.PUBLIC_TEXTS[:3])


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory):
    """Each decoder family as a 4-block CausalLM folder (random weights); in this file it
    stands in for conftest's 2-block `lm_folders`."""
    return write_decoder_folders(tmp_path_factory.mktemp("lm-prune"), LAYERS)


def _cfg(folder: str, *sets: str):
    return load_config(None, [f'model.backbone="{folder}"', *LM, "tuning.method=lora",
                              "train.batch_size=4", "train.local_steps=2",
                              "privacy.reproducible_noise=true", *sets])


def _batch(n: int = 4, t: int = 10, seed: int = 0, side: str = "right"):
    """Rows of random ids; row i has 2i padded positions on `side` (row 0 none)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, t), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, n):
        if side == "right":
            mask[i, t - 2 * i:] = 0
        else:
            mask[i, :2 * i] = 0
    ids[mask == 0] = 0
    if side == "left":  # the LM's targets refuse left padding; the forward still takes it
        return ids, mask, None
    labels = torch.from_numpy(lm_targets(ids.numpy(), mask.numpy())).long()
    return ids, mask, labels


def _from_layer_model(folder: str, from_layer: int = 2, prune=()):
    cfg = _cfg(folder, f"tuning.lora.from_layer={from_layer}")
    backbone = load_backbone(folder, prune, kind="causal_lm")
    model = build_tuned_model(backbone, cfg.tuning, 0, seed=0, kind="causal_lm")
    with torch.no_grad():  # B starts at zero: non-zero adapters, so they change the logits
        for p in model.trainable_state().values():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return model, backbone, cfg


# --- pruning -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_a_pruned_decoder_keeps_norm_and_head_and_forwards_as_if_the_blocks_were_skipped(
        family, lm_folders):
    full = load_backbone(lm_folders[family], kind="causal_lm")
    pruned = load_backbone(lm_folders[family], (1, 2), kind="causal_lm")
    assert pruned.layers_kept == (0, 3)
    structure = derive_structure(pruned.model)
    assert len(structure.layers) == 2 and pruned.model.config.num_hidden_layers == 2
    # The LM head and the final norm stay (the same weights as the unpruned model's).
    assert structure.final_norm is not None
    torch.testing.assert_close(pruned.model.get_output_embeddings().weight,
                               full.model.get_output_embeddings().weight)
    torch.testing.assert_close(structure.final_norm.weight,
                               derive_structure(full.model).final_norm.weight)
    ids, mask, labels = _batch()
    with torch.no_grad():
        logits = pruned.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert logits.shape == (4, 10, full.model.config.vocab_size)
    loss = NextTokenLoss()(logits, labels)
    assert math.isfinite(loss.item()) and loss.item() > 0

    def identity(_m, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    blocks = derive_structure(full.model).layers
    handles = [blocks[i].register_forward_hook(identity, with_kwargs=True) for i in (1, 2)]
    try:
        with torch.no_grad():
            skipped = full.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], skipped[keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", ["every:2", "top:1", "importance:2"])
def test_each_rule_resolves_to_a_list_on_a_decoder(family, rule, lm_folders, few_texts):
    cfg = _cfg(lm_folders[family], f'model.prune_layers="{rule}"')
    resolved = resolve_config(cfg)
    drop = resolved.model.prune_layers
    assert isinstance(drop, list) and drop and len(drop) < LAYERS
    expected = {"every:2": [1, 3], "top:1": [3]}
    if rule in expected:
        assert drop == expected[rule]
    # The list rebuilds the same backbone the rule does, with its LM head.
    again = config_from_toml(resolved.to_toml())
    backbone = load_backbone(lm_folders[family], rule, kind="causal_lm")
    assert backbone.layers_kept == tuple(i for i in range(LAYERS) if i not in drop)
    assert load_backbone(again.model.backbone, tuple(again.model.prune_layers),
                         kind="causal_lm").hash == backbone.hash
    assert backbone.model.get_output_embeddings() is not None


def _kl_on_public_texts(full, pruned, tokenizer) -> float:
    """Independently of the rule's hooks: KL(full || pruned) of the next-token
    distributions, per text averaged over positions, then over the public texts."""
    kls = []
    with torch.no_grad():
        for text in layer_pruning.PUBLIC_TEXTS:
            enc = tokenizer(text, truncation=True, max_length=PUBLIC_MAX_TOKENS,
                            return_tensors="pt")
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                      "use_cache": False}
            p = full(**inputs).logits[0].log_softmax(-1)
            q = pruned(**inputs).logits[0].log_softmax(-1)
            kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
    return sum(kls) / len(kls)


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_on_a_decoder_scores_each_block_by_the_next_token_kl_of_dropping_it(
        family, lm_folders, few_texts):
    """The LM equivalent of the pooled-output distance: how far the next-token
    distributions move when the block is dropped, on the same fixed public texts as the
    classifier's rule (never any split of the run's data)."""
    full = load_backbone(lm_folders[family], kind="causal_lm")
    scores = layer_importance(full.model, full.tokenizer)
    assert len(scores) == LAYERS and all(s > 0 for s in scores)
    for i in range(LAYERS):
        dropped = load_backbone(lm_folders[family], (i,), kind="causal_lm")
        assert scores[i] == pytest.approx(
            _kl_on_public_texts(full.model, dropped.model, full.tokenizer), rel=1e-3)
    least = sorted(sorted(range(LAYERS), key=lambda i: (scores[i], i))[:2])
    assert resolve_config(_cfg(lm_folders[family], 'model.prune_layers="importance:2"')
                          ).model.prune_layers == least
    # The unpruned backbone of a classifier is read for its pooled states instead.
    encoder = load_backbone(lm_folders[family])
    assert layer_importance(encoder.model, encoder.tokenizer) != scores


def test_the_refusals_are_gone_but_bad_settings_still_fail_in_one_line(lm_folders):
    cfg = _cfg(lm_folders["llama"], "model.prune_layers=[1]", "tuning.lora.from_layer=1")
    assert cfg.model.prune_layers == [1] and cfg.tuning.lora.from_layer == 1
    with pytest.raises(ConfigError, match=r"^model.prune_layers=\[4\]: index \[4\] out of "
                                          r"range for this backbone's 4 layers"):
        load_backbone(lm_folders["llama"], (4,), kind="causal_lm")
    with pytest.raises(ConfigError, match=r"^tuning.lora.from_layer=2 is out of range for "
                                          r"this backbone \(2 layers\)"):
        _from_layer_model(lm_folders["llama"], from_layer=2, prune=(1, 2))


# --- LoRA from a layer ---------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_forward_from_the_prefix_states_equals_forward_on_a_padded_batch(family, side,
                                                                       lm_folders):
    model, backbone, _ = _from_layer_model(lm_folders[family])
    assert model.prefix is not None and model.prefix.layer == 2
    blocks = derive_structure(backbone.model).layers_path.rsplit(".", 1)[-1]
    names = list(model.trainable_state())
    # Adapters only in blocks >= 2: nothing before the prefix trains.
    assert names and all(f".{blocks}.2." in n or f".{blocks}.3." in n for n in names)
    ids, mask, _ = _batch(side=side)
    model.eval()
    with torch.no_grad():
        full = model(ids, mask)
        states = model.prefix.states(ids, mask)
        got = model.forward_from(states, mask)
        # The padded positions matter in this batch (left padding: real tokens attend after
        # pads unless masked), so the equality below checks the mask forward_from uses.
        unmasked = model.forward_from(states, torch.ones_like(mask))
    keep = mask.bool()
    assert got.shape == full.shape
    torch.testing.assert_close(got[keep], full[keep], rtol=1e-5, atol=1e-5)
    if side == "left":
        assert not torch.allclose(unmasked[keep], full[keep], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_per_sample_gradients_equal_the_full_forward(family, lm_folders):
    model, _, cfg = _from_layer_model(lm_folders[family])
    ids, mask, labels = _batch(side="right")
    view = training_view(model, TensorDataset(ids, mask, labels), cfg)
    assert view is not None
    cached, rows = view
    model.train()
    for i in range(len(ids)):
        grads = []
        for forward, first in ((model, ids), (cached, rows.tensors[0])):
            model.zero_grad(set_to_none=True)
            NextTokenLoss()(forward(first[i:i + 1], mask[i:i + 1]), labels[i:i + 1]).backward()
            grads.append({n: p.grad.clone() for n, p in model.trainable_state().items()})
        assert grads[0].keys() == grads[1].keys() and any(g.abs().sum() > 0
                                                          for g in grads[0].values())
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dp_sgd_step_on_the_from_layer_model_is_the_uncached_step(family, lm_folders):
    """Pruned to 3 blocks, LoRA from block 1: the same Poisson batches and noise
    (reproducible mode) end at the same adapters and epsilon with and without the cache,
    and the cached step runs fewer blocks."""
    results = {}
    for setting in ("off", "auto"):
        cfg = _cfg(lm_folders[family], f"train.prefix_cache={setting}",
                   "tuning.lora.from_layer=1")
        backbone = load_backbone(lm_folders[family], (3,), kind="causal_lm")
        model = build_tuned_model(backbone, cfg.tuning, 0, seed=0, kind="causal_lm")
        assert skipped_layers(cfg, model) == (1 if setting == "auto" else 0)
        before = {n: p.detach().clone() for n, p in model.trainable_state().items()}
        result = local_train(model, TensorDataset(*_batch(n=12)), cfg, DPHistory(), seed=3)
        after = {n: p.detach().clone() for n, p in model.trainable_state().items()}
        assert result.epsilon is not None and math.isfinite(result.loss)
        assert any(not torch.equal(before[n], after[n]) for n in before)
        results[setting] = (after, result)
    (off, r_off), (on, r_on) = results["off"], results["auto"]
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=1e-4, atol=1e-6)
    assert (r_on.epsilon, r_on.steps, r_on.examples_seen) == (r_off.epsilon, r_off.steps,
                                                              r_off.examples_seen)
    assert r_on.flops < r_off.flops


def test_server_perplexity_from_the_cache_is_the_uncached_one(lm_folders):
    ids, mask, labels = _batch(n=6)
    split = Split(ids.numpy(), mask.numpy(), labels.numpy())
    figures = {}
    for setting in ("off", "auto"):
        cfg = _cfg(lm_folders["llama"], f"train.prefix_cache={setting}",
                   "tuning.lora.from_layer=2", "train.eval_batch_size=4")
        model, _, _ = _from_layer_model(lm_folders["llama"])
        assert cache_applies(cfg, model) == (setting == "auto")
        figures[setting] = _measure(model, split, cfg)
    assert figures["auto"]["tokens"] == figures["off"]["tokens"]
    assert figures["auto"]["loss"] == pytest.approx(figures["off"]["loss"], rel=1e-5)
    assert math.isfinite(figures["auto"]["perplexity"])


def test_a_head_that_is_not_the_lm_head_alone_is_refused_at_build(lm_folders, monkeypatch):
    """A family whose logits are more than its LM head on the last states (capped or
    scaled logits) cannot train from the prefix: refused in one line when built."""
    from fedtune.tuning.causal_lm import CausalLMLoRA

    real = CausalLMLoRA.forward

    def scaled(self, input_ids, attention_mask):
        return 2.0 * real(self, input_ids, attention_mask)

    monkeypatch.setattr(CausalLMLoRA, "forward", scaled)
    with pytest.raises(ConfigError, match=r"^tuning.lora.from_layer=2: this 'llama' model's "
                                          r"logits are not its LM head on its last hidden "
                                          r"states; use from_layer = 0$"):
        _from_layer_model(lm_folders["llama"])


# --- end to end ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.long  # the README's command keeps one LM run (test_lm_e2e); CI runs these after it
def test_fedtune_run_causal_lm_with_pruning_and_lora_from_a_layer(lm_folders, tmp_path):
    """Through the Flower simulation: a 4-block Llama, the importance rule drops one block
    (resolved once, recorded as a list), LoRA from block 1 of the 3 left trains from the
    prefix cache under DP-SGD, and the ledger reports perplexities."""
    from test_e2e_sim import ONE_ACTOR, ROOT, _fedtune_run

    sets = ["name=lmprune", f'model.backbone="{lm_folders["llama"]}"', *LM,
            "tuning.method=lora", "tuning.lora.from_layer=1",
            'model.prune_layers="importance:1"', "model.max_length=16",
            "data.num_clients=2", "train.clients_per_round=2", "train.rounds=1",
            "train.local_steps=2", "train.batch_size=8", "train.eval_max_examples=16",
            "privacy.sample.target_epsilon=8", *ONE_ACTOR]
    out = _fedtune_run(ROOT / "experiments/quickstart.toml", tmp_path / "lm", sets)
    resolved = config_from_toml((out / "config.toml").read_text())
    drop = resolve_config(_cfg(lm_folders["llama"], 'model.prune_layers="importance:1"')
                          ).model.prune_layers
    assert resolved.model.prune_layers == drop and len(drop) == 1
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in rounds] == [1]
    assert rounds[0]["clients"] == 2 and not rounds[0]["failed"]
    assert rounds[0]["forward_layers_skipped"] == 1
    assert math.isfinite(rounds[0]["val_perplexity"]) and rounds[0]["val_accuracy"] is None
    assert math.isfinite(summary["test_perplexity"]) and summary["final_accuracy"] is None
    assert summary["epsilon_sample"] > 0 and summary["method"] == "lora"
    assert summary["layers_kept"] == [i for i in range(LAYERS) if i not in drop]
    pruned = load_backbone(lm_folders["llama"], tuple(drop), kind="causal_lm")
    assert summary["backbone_params"] == pruned.num_params and summary["trainable_params"] > 0
