"""Frozen-prefix cache: a method whose trainable tensors all sit at or above block L trains
and evaluates from cached states entering block L, with the same logits, the same
per-sample gradients and the same DP-SGD update as the full forward; the on-disk cache
hits, misses, evicts, rebuilds what is corrupt, and keys on what the states depend on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    MPNetConfig,
)

from clients.train import local_train
from fedtune.config import ConfigError, load_config
from fedtune.models import backbone_from_model
from fedtune.models.backbone import resolve_backbone_path
from fedtune.privacy import DPHistory
from fedtune.task.evaluation import _measure
from fedtune.task.task import Split, model_spec
from fedtune.tuning import build_tuned_model
from fedtune.tuning.prefix_cache import (
    CachedForward,
    PrefixCache,
    cache_applies,
    skipped_layers,
    training_view,
)

SEQ = 8
# method settings -> the block the cache starts at (tiny backbones have 3 blocks)
METHODS = {
    "prompt": (["tuning.method=prompt", "tuning.prompt.layer=2"], 2),
    "lora": (["tuning.method=lora", "tuning.lora.from_layer=1"], 1),
    "bitfit": (["tuning.method=bitfit", "tuning.bitfit.from_layer=2"], 2),
    "head": (["tuning.method=head"], 3),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))


def _family_config(family: str, vocab: int, layers: int):
    small = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                 intermediate_size=48, max_position_embeddings=64)
    return {
        "bert": lambda: BertConfig(vocab_size=vocab, **small),
        "gpt2": lambda: GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=2,
                                   n_positions=64, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0),
        "llama": lambda: LlamaConfig(vocab_size=vocab, num_key_value_heads=1, pad_token_id=0,
                                     bos_token_id=0, eos_token_id=0, **small),
        "mpnet": lambda: MPNetConfig(vocab_size=vocab, pad_token_id=0, **small),
        "distilbert": lambda: DistilBertConfig(vocab_size=vocab, dim=32, n_layers=layers,
                                               n_heads=2, hidden_dim=48,
                                               max_position_embeddings=64),
    }[family]()


def _backbone(tokenizer, family: str = "bert", layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = _family_config(family, len(tokenizer), layers)
    return backbone_from_model(f"tiny-{family}-{seed}", AutoModel.from_config(config),
                               tokenizer)


@pytest.fixture(scope="module")
def backbone(tokenizer):
    return _backbone(tokenizer)


def _cfg(*sets: str):
    return load_config(None, ["train.batch_size=4", "train.local_steps=2",
                              "tuning.prompt.length=3", "privacy.reproducible_noise=true",
                              *sets])


def _data(n: int = 8, seed: int = 0, seq: int = SEQ) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, seq), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[: n // 2, seq - 3:] = 0  # padded rows
    return TensorDataset(ids, mask, torch.randint(0, 2, (n,), generator=g))


def _model(backbone, cfg):
    model = build_tuned_model(backbone, cfg.tuning, 2, seed=cfg.seed)
    # A non-zero head: with the zero init every input gets the same logits.
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


def _per_sample_grads(model, forward, inputs, mask, labels):
    grads = []
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(forward(inputs[i:i + 1], mask[i:i + 1]),
                                                 labels[i:i + 1])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.trainable_state().items()
                      if p.grad is not None})
    return grads


@pytest.mark.parametrize("method", list(METHODS))
def test_cached_logits_and_per_sample_gradients_equal_the_full_forward(method, backbone):
    sets, layer = METHODS[method]
    cfg = _cfg(*sets)
    model = _model(backbone, cfg)
    assert model.prefix is not None and model.prefix.layer == layer
    data = _data()
    view = training_view(model, data, cfg)
    assert view is not None
    cached, rows_data = view
    ids, mask, labels = data.tensors
    rows = rows_data.tensors[0]
    model.train()
    full = model(ids, mask)
    from_cache = cached(rows, mask)
    torch.testing.assert_close(from_cache, full, rtol=1e-5, atol=1e-6)
    expected = _per_sample_grads(model, model, ids, mask, labels)
    got = _per_sample_grads(model, cached, rows, mask, labels)
    assert expected and all(expected)
    for e, g in zip(expected, got, strict=True):
        assert e.keys() == g.keys()
        for name in e:
            torch.testing.assert_close(g[name], e[name], rtol=1e-4, atol=1e-6)


def test_layer_zero_prompt_is_unchanged_and_keeps_its_spec(backbone):
    cfg = _cfg()
    assert cfg.tuning.prompt.layer == 0 and not cache_applies(cfg, _model(backbone, cfg))
    assert "layer" not in cfg.tuning.fingerprint()["prompt"]
    lora = _cfg("tuning.method=lora")
    assert "from_layer" not in lora.tuning.fingerprint()["lora"]
    model = _model(backbone, cfg)
    assert model.prefix is None
    data = _data()
    ids, mask, _ = data.tensors
    embeds, full_mask = model.embed_inputs(ids, mask)
    hidden = backbone.model(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
    torch.testing.assert_close(model(ids, mask), model.classify(hidden, mask))
    late = _cfg("tuning.prompt.layer=2")
    assert (model_spec(_model(backbone, late), backbone, late, 2).hash
            != model_spec(model, backbone, cfg, 2).hash)


@pytest.mark.parametrize("method, mode", [("prompt", "hooks"), ("head", "hooks"),
                                          ("lora", "ghost")])
def test_dp_sgd_from_the_cache_takes_the_same_step(method, mode, backbone):
    """Same Poisson batches and the same noise (reproducible mode): cached and uncached
    training end at the same trainable state and the same epsilon."""
    sets, _ = METHODS[method]
    results = {}
    for setting in ("off", "on"):
        cfg = _cfg(*sets, f"train.prefix_cache={setting}",
                   f"privacy.sample.grad_sample_mode={mode}")
        model = _model(backbone, cfg)
        before = {n: p.detach().clone() for n, p in model.trainable_state().items()}
        result = local_train(model, _data(16), cfg, DPHistory(), seed=3)
        after = {n: p.detach().clone() for n, p in model.trainable_state().items()}
        assert any(not torch.equal(before[n], after[n]) for n in before)
        results[setting] = (after, result)
    (off, r_off), (on, r_on) = results["off"], results["on"]
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=1e-4, atol=1e-6)
    assert r_on.epsilon == r_off.epsilon and r_on.examples_seen == r_off.examples_seen
    assert r_on.flops < r_off.flops  # fewer blocks per step


def test_head_only_trains_with_dp_and_exchanges_a_delta(backbone):
    cfg = _cfg("tuning.method=head")
    model = build_tuned_model(backbone, cfg.tuning, 2, seed=0)
    spec = model_spec(model, backbone, cfg, 2)
    assert set(model.trainable_state()) == {"head.net.0.weight", "head.net.0.bias"}
    start = spec.flatten(model.trainable_state())
    result = local_train(model, _data(16), cfg, DPHistory(), seed=0)
    delta = spec.flatten(model.trainable_state()) - start
    assert result.epsilon is not None and np.abs(delta).sum() > 0
    restored = spec.unflatten(start + delta)
    torch.testing.assert_close(restored["head.net.0.bias"], model.head.net[0].bias.detach())


def test_server_evaluation_from_the_cache_gives_the_same_figures(backbone):
    data = _data(10)
    split = Split(*(t.numpy() for t in data.tensors))
    figures = {}
    for setting in ("off", "auto"):
        cfg = _cfg(*METHODS["lora"][0], f"train.prefix_cache={setting}",
                   "train.eval_batch_size=4")
        figures[setting] = _measure(_model(backbone, cfg), split, cfg)
    assert figures["auto"]["accuracy"] == figures["off"]["accuracy"]
    assert figures["auto"]["loss"] == pytest.approx(figures["off"]["loss"], rel=1e-5)


def test_cache_hits_misses_evicts_and_rebuilds_a_corrupt_entry(backbone, tmp_path):
    cfg = _cfg("tuning.method=head")
    prefix = _model(backbone, cfg).prefix
    entry = 6 * SEQ * 32 * 4  # rows x tokens x hidden x float32
    cache = PrefixCache(tmp_path, max_bytes=2 * entry + 2000)
    a, b, c = (_data(6, seed=s).tensors[:2] for s in (1, 2, 3))
    first = np.array(cache.states(prefix, *a))
    assert (cache.stats.misses, cache.stats.hits) == (1, 0)
    np.testing.assert_array_equal(cache.states(prefix, *a), first)
    assert cache.stats.hits == 1
    torch.testing.assert_close(torch.from_numpy(first), prefix.states(*a))
    cache.states(prefix, *b)
    PrefixCache(tmp_path, cache.max_bytes).states(prefix, *a)  # a: most recently used
    cache.states(prefix, *c)  # over the bound: b, the least recently used, goes
    assert cache.stats.evicted == 1 and len(list(tmp_path.glob("*.json"))) == 2
    other = PrefixCache(tmp_path, cache.max_bytes)
    other.states(prefix, *a)
    other.states(prefix, *b)
    assert (other.stats.hits, other.stats.misses) == (1, 1)
    # Corrupt a's data: a fresh process (no checksum memo) must rebuild, not trust it.
    index = next(p for p in tmp_path.glob("*.json")
                 if np.array_equal(np.load(tmp_path / json.loads(p.read_text())["data"]),
                                   first))
    data_file = tmp_path / json.loads(index.read_text())["data"]
    raw = np.load(data_file)
    raw[0, 0, 0] += 1.0
    np.save(data_file, raw)
    fresh = PrefixCache(tmp_path, cache.max_bytes)
    np.testing.assert_array_equal(fresh.states(prefix, *a), first)
    assert (fresh.stats.rebuilt, fresh.stats.misses) == (1, 1)
    index.write_text("{not json")
    again = PrefixCache(tmp_path, cache.max_bytes)
    np.testing.assert_array_equal(again.states(prefix, *a), first)
    assert again.stats.rebuilt == 1


def test_an_entry_larger_than_the_bound_is_computed_but_not_stored(backbone, tmp_path):
    prefix = _model(backbone, _cfg("tuning.method=head")).prefix
    cache = PrefixCache(tmp_path, max_bytes=100)
    ids, mask = _data(4).tensors[:2]
    torch.testing.assert_close(torch.from_numpy(cache.states(prefix, ids, mask)),
                               prefix.states(ids, mask))
    assert cache.stats.too_large == 1 and not list(tmp_path.glob("*.npy"))


def test_the_key_changes_with_max_length_backbone_and_layer(tokenizer, backbone, tmp_path):
    cache = PrefixCache(tmp_path, max_bytes=10**8)
    ids, mask = _data(4).tensors[:2]
    prompt2 = _model(backbone, _cfg("tuning.prompt.layer=2")).prefix
    cache.states(prefix=prompt2, input_ids=ids, attention_mask=mask)
    # Same rows, one more (padding) token: another tokenization, another entry.
    longer = torch.cat([ids, torch.zeros_like(ids[:, :1])], 1)
    cache.states(prompt2, longer, torch.cat([mask, torch.zeros_like(mask[:, :1])], 1))
    prompt1 = _model(backbone, _cfg("tuning.prompt.layer=1")).prefix
    cache.states(prompt1, ids, mask)
    other = _backbone(tokenizer, seed=1)
    cache.states(_model(other, _cfg("tuning.prompt.layer=2")).prefix, ids, mask)
    assert cache.stats.misses == 4 and cache.stats.hits == 0
    # BitFit from block 2 shares the prompt-at-2 entry: same frozen weights below it.
    cache.states(_model(backbone, _cfg(*METHODS["bitfit"][0])).prefix, ids, mask)
    assert cache.stats.hits == 1


@pytest.mark.parametrize("family", ["gpt2", "llama", "mpnet", "distilbert"])
@pytest.mark.parametrize("method", ["prompt", "head"])
def test_other_families_train_from_the_cache_with_the_same_logits(family, method, tokenizer):
    """Decoders (final norm, rotary positions), relative position bias, DistilBERT."""
    other = _backbone(tokenizer, family)
    cfg = _cfg(*(["tuning.prompt.layer=1"] if method == "prompt" else METHODS["head"][0]))
    model = _model(other, cfg)
    data = _data()
    cached, rows = training_view(model, data, cfg)
    torch.testing.assert_close(cached(rows.tensors[0], data.tensors[1]),
                               model(*data.tensors[:2]), rtol=1e-5, atol=1e-6)


def test_ledger_field_is_the_servers_own_count(backbone):
    for method, (sets, layer) in METHODS.items():
        cfg = _cfg(*sets)
        assert skipped_layers(cfg, _model(backbone, cfg)) == layer, method
        off = _cfg(*sets, "train.prefix_cache=off")
        assert skipped_layers(off, _model(backbone, off)) == 0
    plain = _cfg()
    assert skipped_layers(plain, _model(backbone, plain)) == 0


@pytest.mark.parametrize("sets, message", [
    (["train.prefix_cache=on"], "tuning.method='prompt' as configured trains the first"),
    (["train.prefix_cache=on", "tuning.method=lora"], "frozen prefix"),
    (["train.prefix_cache=on", "tuning.method=slash"], "frozen prefix"),
    (["train.prefix_cache=yes"], "train.prefix_cache='yes' is not one of: auto, on, off"),
    (["tuning.prompt.layer=-1"], "tuning.prompt.layer must be >= 0"),
    (["tuning.method=lora", "tuning.lora.from_layer=-2"], "tuning.lora.from_layer"),
    (["split.enabled=true", "tuning.prompt.layer=2"],
     "split.enabled=true needs tuning.method='prompt' to start at the word embeddings"),
    (["split.enabled=true", "train.prefix_cache=on", "tuning.method=head"],
     "split.enabled=true needs tuning.method in"),
    (["runtime.prefix_cache_gb=0"], "runtime.prefix_cache_gb must be > 0"),
])
def test_a_config_that_cannot_use_the_cache_is_a_one_line_error(sets, message):
    with pytest.raises(ConfigError) as err:
        _cfg(*sets)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("sets, message", [
    (["tuning.prompt.layer=3"], "tuning.prompt.layer=3 is out of range for this backbone "
                                "(3 layers): allowed 0..2"),
    (["tuning.method=lora", "tuning.lora.from_layer=3"], "tuning.lora.from_layer=3 is out"),
    (["tuning.method=bitfit", "tuning.bitfit.from_layer=5"], "tuning.bitfit.from_layer=5"),
])
def test_a_layer_beyond_the_backbone_is_a_one_line_error(backbone, sets, message):
    with pytest.raises(ConfigError) as err:
        build_tuned_model(backbone, _cfg(*sets).tuning, 2, seed=0)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cached_forward_exposes_only_the_tuned_tensors(backbone):
    cfg = _cfg("tuning.prompt.layer=2")
    model = _model(backbone, cfg)
    cached = CachedForward(model, np.zeros((1, SEQ, 32), dtype=np.float32))
    assert list(cached.trainable_state()) == list(model.trainable_state())
    assert cached.method == "prompt"
