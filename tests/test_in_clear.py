"""The ledger's list of what leaves a client in clear follows the configuration."""

from fedtune.config import load_config
from fedtune.wire.in_clear import in_clear


def test_default_run_withholds_counts_and_loss_and_lists_the_reported_dp_spend():
    listed = in_clear(load_config(None, []))  # sample-level DP on
    assert {"delta", "reported DP spend"} <= set(listed["sent"])
    assert "reveals the data size n" in listed["sent"]["reported DP spend"]
    assert {"num_examples", "loss", "examples_seen, flops"} <= set(listed["withheld"])
    assert not {"num_examples", "loss"} & set(listed["sent"])


def test_disclose_counts_sends_them_and_says_so():
    listed = in_clear(load_config(None, ["privacy.disclose_counts=true"]))
    assert {"delta", "num_examples", "loss", "reported DP spend"} <= set(listed["sent"])
    assert listed["withheld"] == [] and listed["disclose_counts"] is True
    assert listed["sent"]["loss"].endswith("[in clear]")


def test_withholding_moves_counts_and_plugin_figures_to_withheld():
    cfg = load_config(None, ["privacy.sample.enabled=false", "privacy.user.enabled=true",
                             "privacy.user.clipping=client",
                             "privacy.user.withhold_metrics=true"])
    cfg.plugins = [{"name": "el2n_pruning", "keep": 0.5}]
    listed = in_clear(cfg)
    assert {"num_examples", "loss", "pruning figures"} <= set(listed["withheld"])
    assert not {"num_examples", "loss", "reported DP spend"} & set(listed["sent"])
    assert "clipped on the client" in listed["sent"]["delta"]


def test_split_mode_points_at_the_smashed_data():
    cfg = load_config(None, ["split.enabled=true"])
    sent = in_clear(cfg)["sent"]
    assert "every trained example" in sent["split training: cut-layer activations"]
    assert sent["split training: cut-layer activations"].endswith("[in clear]")
    assert "synthetic" in sent["FLOP probe"]
