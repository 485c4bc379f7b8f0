"""What leaves a client in clear, for the ledger's privacy section (`privacy_in_clear`).

The epsilons cover what the model release says about a client's data (user level) or what
its uploads say about one example (sample level, DP-SGD). The server also receives some
figures in clear that no epsilon covers; this lists them, per configuration, with what
each reveals, so nobody has to read the protocol to find out.
"""

from __future__ import annotations

from fedtune.config import ExperimentConfig


def in_clear(cfg: ExperimentConfig) -> dict[str, object]:
    """{"sent": {item: what it reveals}, "withheld": [items kept on the client]}."""
    user, sample = cfg.privacy.user, cfg.privacy.sample
    sent: dict[str, str] = {
        "delta": _delta_note(cfg),
        "participation": "which partition replied, when, and with how many bytes",
        "steps": "local steps taken (with train.local_epochs > 0 they reveal the data size)",
    }
    counts = {
        "num_examples": "the client's number of training examples",
        "loss": "the client's mean training loss this round",
        "examples_seen, flops": "examples trained and compute spent (reveal the data size)",
    }
    plugin_figures = _plugin_figures(cfg)
    withheld: list[str] = []
    if user.enabled and user.withhold_metrics:
        withheld = [*counts, *plugin_figures]
    else:
        sent.update(counts)
        sent.update(plugin_figures)
    if sample.enabled:
        sent["reported DP spend"] = (
            "noise_multiplier, sample_rate, steps, epsilon and the DP history the client "
            "reports; sample_rate = batch / n reveals the data size n")
    if cfg.split.enabled:
        sent["split-mode smashed data"] = (
            "cut-layer activations and body-output gradients of every trained example: "
            "see this ledger's split fields and the README's split-mode section")
    return {"sent": sent, "withheld": withheld}


def _delta_note(cfg: ExperimentConfig) -> str:
    user = cfg.privacy.user
    if user.enabled and user.clipping == "client":
        return ("the client's delta, clipped on the client to privacy.user.clip_norm; its "
                "norm up to that bound")
    note = "the client's delta and its norm (unclipped)"
    if cfg.privacy.sample.enabled:
        note += "; DP-SGD noise covers each example in it"
    return note


def _plugin_figures(cfg: ExperimentConfig) -> dict[str, str]:
    names = {table.get("name") for table in cfg.plugins}
    figures: dict[str, str] = {}
    if "el2n_pruning" in names:
        figures["pruning figures"] = ("examples available and kept, rescoring, FLOPs saved "
                                      "(reveal the data size)")
    if "population_expansion" in names:
        figures["importance_weight"] = "mean importance weight of a source client's examples"
    if cfg.split.enabled:
        figures["split figures"] = "smashed bytes, split and local-loss steps and examples"
    return figures
