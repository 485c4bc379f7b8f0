"""Split mode (SFPrompt): the cut composes to the full model, split training gives the
unsplit deltas, DP-SGD still clips per sample, local-loss steps skip the server, and the
FLOPs/bytes accounting matches the shapes."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_gpt2
from flwr.app import Context, RecordDict
from torch.utils.data import DataLoader, TensorDataset

from clients import split as split_client
from clients.plugins import el2n as pruning
from clients.train import LocalResult, local_train
from fedtune.config import ConfigError, SampleDPConfig, load_config
from fedtune.models import load_backbone
from fedtune.privacy import DPHistory, make_private
from fedtune.split import InProcessBody, SplitPromptModel, split_flops
from fedtune.split.cut import SplitBackbone, SplitError
from fedtune.tuning import build_tuned_model
from fedtune.wire.protocol import PruneSettings

BASE = ["train.batch_size=8", "tuning.prompt.length=4"]


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("minilm")


@pytest.fixture(scope="module")
def tiny_decoder():
    """A 3-layer `tiny_gpt2`."""
    return tiny_gpt2(3)


def _data(n=24, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2900, (n, length), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[: n // 4, length // 2:] = 0  # some padded rows
    return TensorDataset(ids, mask, torch.randint(0, 2, (n,), generator=g))


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _split_model(backbone, cfg, context=None):
    model = build_tuned_model(backbone, cfg.tuning, 2, seed=cfg.seed)
    task = SimpleNamespace(backbone=backbone, num_labels=2)
    split = SplitBackbone(backbone.model, cfg.split.cut_layer)
    aux = None
    if cfg.split.local_loss_fraction > 0:
        aux = split_client.split_view(model, task, cfg, context or _context()).aux
    return model, SplitPromptModel(model, split, aux)


def _train_split(backbone, cfg, data, steps, context=None, seed=5):
    model, view = _split_model(backbone, cfg, context)
    body = InProcessBody(view.split)
    local = int(cfg.split.local_loss_fraction * steps)
    step = split_client.SplitStep(view, body, local)
    result = local_train(view, data, cfg, DPHistory(), seed=seed, step=step)
    return model, view, result


# ----------------------------------------------------------------------------- the cut


@pytest.mark.parametrize("family", ["minilm", "tiny_decoder"])
def test_head_then_body_is_the_models_own_forward_at_every_cut(family, request):
    backbone = request.getfixturevalue(family)
    model = backbone.model
    ids, mask, _ = _data(4, 12).tensors
    embeds = model.get_input_embeddings()(ids)
    reference = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    layers = model.config.num_hidden_layers
    for k in range(layers):
        split = SplitBackbone(model, k)
        out = split.body(split.head(split.embed(embeds), mask), mask)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_a_cut_outside_the_model_names_the_field_and_range(minilm):
    with pytest.raises(SplitError, match=r"split.cut_layer=6 .*allowed 0..5"):
        SplitBackbone(minilm.model, 6)


def test_config_rejects_split_with_other_methods_ghost_clipping_and_bad_values():
    with pytest.raises(ConfigError, match="tuning.method"):
        load_config(None, ["split.enabled=true", "tuning.method=lora"])
    with pytest.raises(ConfigError, match="ghost"):
        load_config(None, ["split.enabled=true", "privacy.sample.grad_sample_mode=ghost"])
    with pytest.raises(ConfigError, match="split.local_loss_fraction"):
        load_config(None, ["split.local_loss_fraction=1.0"])
    with pytest.raises(ConfigError, match="split.cut_layer"):
        load_config(None, ["split.cut_layer=-1"])
    with pytest.raises(ConfigError, match="rounds down to no local-loss step"):
        load_config(None, ["split.enabled=true", "split.local_loss_fraction=0.05"])
    pruned = load_config(None, ["split.enabled=true", "privacy.sample.enabled=false",
                                'plugins=[{name = "el2n_pruning", keep = 0.5}]'])
    assert pruned.split.enabled and pruned.plugins[0]["name"] == "el2n_pruning"
    with pytest.raises(ConfigError, match="unknown key split.cut"):
        load_config(None, ["split.cut=1"])
    assert load_config(None, ["split.enabled=true", "split.cut_layer=0"]).split.cut_layer == 0


def test_body_service_backward_is_the_gradient_through_the_body(minilm):
    split = SplitBackbone(minilm.model, 2)
    body = InProcessBody(split)
    ids, mask, _ = _data(3, 10).tensors
    smashed = torch.randn(3, 10, minilm.hidden_size, requires_grad=True)
    grad_out = torch.randn(3, 10, minilm.hidden_size)
    out = body.forward(smashed, mask)
    assert not out.requires_grad  # what comes down is data, not a graph
    grad = body.backward(grad_out)
    (expected,) = torch.autograd.grad(split.body(smashed, mask), smashed, grad_out)
    torch.testing.assert_close(grad, expected)
    with pytest.raises(RuntimeError, match="without a forward"):
        body.backward(grad_out)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("cut,dp", [(0, False), (1, False), (1, True)])
def test_split_and_unsplit_training_give_the_same_deltas(minilm, cut, dp):
    # Reproducible noise: both runs must draw the same DP noise and Poisson batches.
    sets = BASE + ["train.local_steps=3", f"privacy.sample.enabled={str(dp).lower()}",
                   "split.enabled=true", f"split.cut_layer={cut}",
                   "privacy.reproducible_noise=true"]
    cfg = load_config(None, sets)
    data = _data()
    plain = build_tuned_model(minilm, cfg.tuning, 2, seed=cfg.seed)
    start = {n: t.detach().clone() for n, t in plain.trainable_state().items()}
    expected = local_train(plain, data, cfg, DPHistory(), seed=5)
    model, _, got = _train_split(minilm, cfg, data, steps=3)
    assert list(model.trainable_state()) == list(plain.trainable_state())
    for name, tensor in plain.trainable_state().items():
        assert not torch.equal(tensor, start[name])  # it did train
        torch.testing.assert_close(model.trainable_state()[name], tensor,
                                   rtol=1e-5, atol=1e-6)
    assert got.loss == pytest.approx(expected.loss, rel=1e-5)
    assert got.examples_seen == expected.examples_seen
    # The client's and the server's FLOPs add up to the unsplit client's, give or take the
    # head's backward that the unsplit prompt pays too.
    total = got.flops + got.extras["server-flops"]
    assert total == pytest.approx(expected.flops, rel=0.01)


def test_decoder_split_training_gives_the_unsplit_deltas_under_dp(tiny_decoder):
    cfg = load_config(None, BASE + ["train.local_steps=2", "split.enabled=true",
                                    "split.cut_layer=1", "privacy.reproducible_noise=true"])
    data = _data()
    plain = build_tuned_model(tiny_decoder, cfg.tuning, 2, seed=cfg.seed)
    local_train(plain, data, cfg, DPHistory(), seed=5)
    model, _, _ = _train_split(tiny_decoder, cfg, data, steps=2)
    for name, tensor in plain.trainable_state().items():
        torch.testing.assert_close(model.trainable_state()[name], tensor, rtol=1e-5, atol=1e-6)


def test_dp_sgd_clips_each_examples_gradient_when_the_backward_comes_from_the_server(minilm):
    """One DP step of a split model with zero noise must equal the mean of the per-example
    gradients of the unsplit model, each clipped to max_grad_norm."""
    clip = 1e-3
    cfg = load_config(None, BASE + ["split.enabled=true", "split.cut_layer=1"])
    data = _data(16)
    _, view = _split_model(minilm, cfg)
    optimizer = torch.optim.SGD(view.param_groups(0.1))
    private = make_private(view, optimizer, DataLoader(data, batch_size=8),
                           SampleDPConfig(max_grad_norm=clip), 0.0, reproducible_seed=0)
    step = split_client.SplitStep(view, InProcessBody(view.split), 0)
    ids, mask, labels = (t[:8] for t in data.tensors)
    try:
        private.optimizer.zero_grad(set_to_none=True)
        step(private.model, private.criterion, ids, mask, labels, 0)
        private.optimizer.pre_step()  # clip per sample, add (zero) noise, average
        got = torch.cat([p.grad.reshape(-1) for p in view.trainable_state().values()])
    finally:
        private.close()

    reference = build_tuned_model(minilm, cfg.tuning, 2, seed=cfg.seed)
    clipped, norms = [], []
    for i in range(8):
        reference.zero_grad(set_to_none=True)
        logits = reference(ids[i:i + 1], mask[i:i + 1])
        torch.nn.functional.cross_entropy(logits, labels[i:i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in reference.trainable_state().values()])
        norms.append(float(g.norm()))
        clipped.append(g * min(1.0, clip / (float(g.norm()) + 1e-6)))
    assert min(norms) > 10 * clip  # every example was clipped
    torch.testing.assert_close(got, torch.stack(clipped).sum(0) / 8, rtol=1e-3, atol=1e-9)
    assert float(got.norm()) <= clip * (1 + 1e-4)


@pytest.mark.parametrize("dp", [False, True])
def test_local_loss_steps_skip_the_server_and_halve_the_smashed_bytes(minilm, dp):
    # Seeded noise: a secret Poisson batch (q = 8/24) is empty with chance (2/3)^24 and is
    # skipped, so 4 steps would count 3 (2.4e-4 a run); the seeded batches are all non-empty.
    flag = f"privacy.sample.enabled={str(dp).lower()}", "privacy.reproducible_noise=true"
    plain_cfg = load_config(None, BASE + ["train.local_steps=4", *flag, "split.enabled=true"])
    _, _, plain = _train_split(minilm, plain_cfg, _data(), steps=4)
    cfg = load_config(None, BASE + ["train.local_steps=4", *flag, "split.enabled=true",
                                    "split.local_loss_fraction=0.5"])
    context = _context()
    model, view, got = _train_split(minilm, cfg, _data(), steps=4, context=context)
    assert (got.extras["local-loss-steps"], got.extras["split-steps"]) == (2, 2)
    plain_model = build_tuned_model(minilm, cfg.tuning, 2, seed=cfg.seed)
    # The aux head is never federated; the tail is trainable again after the round.
    assert list(model.trainable_state()) == list(plain_model.trainable_state())
    assert list(view.trainable_state()) == list(model.trainable_state())
    assert float(view.aux.net[0].weight.detach().abs().sum()) > 0  # it learned from the local loss
    if not dp:  # fixed batches: exactly half the exchanges
        assert got.extras["smashed-bytes-up"] * 2 == plain.extras["smashed-bytes-up"]
        assert got.extras["smashed-bytes-down"] * 2 == plain.extras["smashed-bytes-down"]
    split_client.save_aux(view, context)
    reloaded = split_client.split_view(model, SimpleNamespace(backbone=minilm, num_labels=2),
                                       cfg, context)
    torch.testing.assert_close(reloaded.aux.state_dict(), view.aux.state_dict())


def test_smashed_bytes_are_the_tensors_that_cross(minilm):
    cfg = load_config(None, BASE + ["train.local_steps=2", "privacy.sample.enabled=false",
                                    "split.enabled=true"])
    _, _, got = _train_split(minilm, cfg, _data(), steps=2)
    n, length = got.extras["split-examples"], 16 + 4  # tokens + prompt
    states = n * length * minilm.hidden_size * 4  # float32 hidden states
    mask = n * length * 8  # int64 attention mask
    assert got.extras["smashed-bytes-up"] == states + mask + states  # smashed, mask, grad
    assert got.extras["smashed-bytes-down"] == states + states  # body output, grad at cut


def test_client_flops_fraction_at_the_quickstart_shapes(minilm):
    """64 tokens + a 20-token prompt: k = 0 leaves the client almost nothing, k = 1 about
    one layer's forward and input-gradient backward of six."""
    ids = torch.randint(1000, 2900, (64,))
    fractions = {}
    for cut in (0, 1):
        cfg = load_config(None, ["split.enabled=true", f"split.cut_layer={cut}",
                                 "split.local_loss_fraction=0.5"])
        _, view = _split_model(minilm, cfg)
        flops = split_flops(view, InProcessBody(view.split), int(ids.shape[0]))
        fractions[cut] = flops.client_fraction()
        assert flops.client_fraction(local_loss=True) <= flops.client_fraction() * 1.01
        assert flops.server > flops.client_split
    assert fractions[0] <= 0.01
    assert fractions[1] <= 0.20


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("cut", [0, 1])
def test_split_scoring_gives_the_whole_models_el2n_and_meters_its_traffic(minilm, cut):
    cfg = load_config(None, BASE + ["split.enabled=true", f"split.cut_layer={cut}",
                                    "privacy.sample.enabled=false"])
    model, view = _split_model(minilm, cfg)
    data = _data(n=20)
    scorer = split_client.SplitScorer(view, cfg)
    whole = pruning.el2n_scores(pruning.ModelScorer(model), data)
    np_split = pruning.el2n_scores(scorer, data)
    torch.testing.assert_close(torch.from_numpy(np_split), torch.from_numpy(whole),
                               rtol=1e-5, atol=1e-6)
    states = 20 * (16 + 4) * minilm.hidden_size * 4
    assert scorer.body.traffic.bytes_up == states + 20 * (16 + 4) * 8  # smashed + mask
    assert scorer.body.traffic.bytes_down == states  # body output; no backward
    client = scorer.client_flops(data)
    assert 0 < client < pruning.ModelScorer(model).client_flops(data)
    assert scorer.server_flops > client


def test_pruned_split_client_records_the_smashed_bytes_pruning_really_saved(minilm):
    """DP off and batches that divide the data: the expected saving is exact, so it must
    equal the measured difference to an unpruned client minus the scoring traffic."""
    cfg = load_config(None, BASE + ["split.enabled=true", "split.cut_layer=1",
                                    "privacy.sample.enabled=false", "train.local_epochs=1",
                                    "split.local_loss_fraction=0.5"])
    data = _data(n=32)
    _, _, full = _train_split(minilm, cfg, data, steps=4)

    context = _context()
    model, view = _split_model(minilm, cfg, context)
    scorer = split_client.SplitScorer(view, cfg)
    selection = pruning.select(scorer, data, PruneSettings(keep=0.5, every=0), context,
                               server_round=1)
    assert selection.rescored and len(selection.indices) == 16
    kept = TensorDataset(*(t[selection.indices] for t in data.tensors))
    step = split_client.split_step(view, cfg, 2)
    result = local_train(view, kept, cfg, DPHistory(), seed=5, step=step)
    assert isinstance(result, LocalResult) and result.steps == 2
    metrics = {**result.extras, **pruning.round_metrics(selection, result, cfg, len(kept))}
    trained_bytes = metrics["smashed-bytes-up"] + metrics["smashed-bytes-down"]
    scorer.add_costs(metrics, selection, result, cfg, len(kept))
    scoring = scorer.body.traffic.bytes_up + scorer.body.traffic.bytes_down
    assert metrics["scoring-smashed-bytes"] == scoring > 0
    assert metrics["smashed-bytes-up"] + metrics["smashed-bytes-down"] == trained_bytes + scoring
    full_bytes = full.extras["smashed-bytes-up"] + full.extras["smashed-bytes-down"]
    assert metrics["smashed-bytes-saved"] == full_bytes - trained_bytes - scoring
    assert metrics["server-flops-saved"] == pytest.approx(
        full.extras["server-flops"] - result.extras["server-flops"] - scorer.server_flops)
    assert metrics["examples-kept"] == 16 and metrics["examples-available"] == 32


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_fedtune_run_in_split_mode_composes_with_local_loss_pruning_and_expansion(tmp_path):
    from test_e2e_sim import ONE_ACTOR, OVERRIDES, ROOT, _fedtune_run

    sets = [o for o in OVERRIDES if not o.startswith("train.rounds")] + [
        "train.rounds=2", "split.enabled=true", "split.cut_layer=1",
        "privacy.disclose_counts=true",  # the test reads the split and pruning figures
        # Every sampled client scores all of its examples, through the cut: 24 partitions
        # of 157-243 examples (8 of them the target domain's), not 8 of 420-971 (2 target).
        "data.num_clients=24", "split.local_loss_fraction=0.5", "data.partition=iid",
        "data.domain_by=collection",
        "data.target_domain=set2", "data.target_clients=8",
        'plugins=[{name = "el2n_pruning", keep = 0.5, allow_with_sample_dp = true}, '
        '{name = "population_expansion", weighting = "fixed", lam = 0.5}]', *ONE_ACTOR]
    out = _fedtune_run(ROOT / "experiments/quickstart.toml", tmp_path / "split", sets)
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    cfg = load_config(out / "config.toml")
    hidden = 384
    tokens = cfg.model.max_length + cfg.tuning.prompt.length
    steps = cfg.train.local_steps
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["clients"] == 2 and not r["failed"] and not r["rejected"]
        # local_loss_fraction 0.5 of each client's steps, 2 clients.
        assert r["local_loss_steps"] == r["split_steps"] == 2 * (steps // 2)
        assert r["delta_bytes_up"] == r["bytes_up"] > 0
        for c in r["per_client"]:
            # Scoring sends every local example through the body once, forward only.
            n, scored = c["split_examples"], c["rescored"] * c["examples_available"]
            assert c["smashed_bytes_up"] == (n * tokens * (2 * hidden * 4 + 8)
                                             + scored * tokens * (hidden * 4 + 8))
            assert c["smashed_bytes_down"] == (n * tokens * 2 * hidden * 4
                                               + scored * tokens * hidden * 4)
            assert c["scoring_smashed_bytes"] == scored * tokens * (2 * hidden * 4 + 8)
            assert c["examples_seen"] == n + c["local_loss_examples"]
            assert c["examples_kept"] == -(-c["examples_available"] // 2)
            source = c["partition_id"] >= cfg.data.target_clients
            assert c["weight"] == (0.5 if source else 1.0)  # a source client's: lam
        assert r["smashed_bytes_up"] == sum(c["smashed_bytes_up"] for c in r["per_client"])
        assert 0 < r["client_flops_fraction"] <= 0.20
        assert r["server_flops"] > r["client_flops"]
        assert r["pruning"]["scoring_smashed_bytes"] == sum(
            c["scoring_smashed_bytes"] for c in r["per_client"])
        assert "smashed_bytes_saved" in r["pruning"]
        assert r["expansion"]["weighting"] == "fixed"
    assert rounds[0]["pruning"]["scoring_smashed_bytes"] > 0
    assert summary["eval_domain"] == "collection=set2"
    assert summary["total_smashed_bytes_up"] == sum(r["smashed_bytes_up"] for r in rounds)
    assert summary["method"] == "prompt" and summary["final_accuracy"] > 0
