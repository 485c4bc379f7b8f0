"""Population expansion for the causal LM (issue 29, item 4): a target domain named by a list
of values, natural partitioning per side with the right client counts in its error, the LM's
refusals (importance weighting, el2n) and acceptance (fixed, anneal), target-only validation
and test rows, and one tiny end-to-end expansion run under user-level DP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.data import PartitionError, load_corpus, partition_domains, target_rows

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["forteana", "social", "iiu"]
LM = ["task.kind=causal_lm", "data.partition=iid", "privacy.sample.enabled=false",
      "train.clients_per_round=2", "data.domain_by=mailing_list"]
EXPAND = 'plugins=[{name = "population_expansion", weighting = "%s"}]'


def _lm(*extra: str):
    return load_config(None, [*LM, f"data.target_domain={json.dumps(SMALL)}",
                              "data.num_clients=8", "data.target_clients=3", *extra])


# -- the target domain as a list (both task kinds) --------------------------------------------

def test_a_list_of_values_makes_one_target_domain_for_both_kinds():
    for kind in ("classification", "causal_lm"):
        cfg = load_config(None, [f"task.kind={kind}", "data.partition=iid",
                                 "privacy.sample.enabled=false", "data.domain_by=mailing_list",
                                 'data.target_domain=["forteana", "social"]',
                                 "data.num_clients=6", "data.target_clients=2",
                                 "train.clients_per_round=2"])
        assert cfg.data.target_values == ("forteana", "social")
        assert cfg.data.eval_domain == "mailing_list in [forteana, social]"
    one = load_config(None, ["data.domain_by=collection", "data.target_domain=set2",
                             "data.num_clients=4", "data.target_clients=2",
                             "train.clients_per_round=2"]).data
    assert one.target_values == ("set2",) and one.eval_domain == "collection=set2"
    train = load_corpus("spamassassin")["train"]
    lists = np.asarray(["" if v is None else v for v in train["mailing_list"]])
    rows = target_rows(train, "mailing_list", ["forteana", "social"], "train")
    assert set(lists[rows]) == {"forteana", "social"}
    assert rows.size == np.isin(lists, ["forteana", "social"]).sum()


@pytest.mark.parametrize("value, message", [
    ("[]", r"^data.target_domain lists 0 values; give 1 to 10000 \(or one string\)$"),
    ('["iiu", "iiu"]', r"^data.target_domain lists 'iiu' twice$"),
    ('["iiu", " "]', r"^data.target_domain\[1\] must not be empty$"),
    ("3", r"^data.target_domain must be a string or a list, got 3$"),
    ('""', r"^data.target_domain must not be empty$"),
])
def test_a_bad_target_domain_is_refused_in_one_line(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.domain_by=mailing_list", f"data.target_domain={value}",
                           "data.num_clients=4", "data.target_clients=2"])


def test_unknown_target_values_are_named_in_one_line_and_a_test_split_needs_only_one():
    train, test = load_corpus("spamassassin")["train"], load_corpus("spamassassin")["test"]
    with pytest.raises(PartitionError) as info:
        target_rows(train, "mailing_list", ["forteana", "no-such-list", "nor-this"], "train")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.target_domain=values ['no-such-list', 'nor-this'] "
                              "matches no row of the train split by 'mailing_list'")
    # "freshmeat-news" has a training message and no test message: the test split still
    # serves the target domain through the other lists.
    lists = set(test["mailing_list"])
    assert "freshmeat-news" not in lists and "forteana" in lists
    rows = target_rows(test, "mailing_list", ["forteana", "freshmeat-news"], "test")
    assert rows.size > 0
    with pytest.raises(PartitionError, match="value \\['freshmeat-news'\\] matches no row"):
        target_rows(train.select(range(100)), "mailing_list", ["freshmeat-news"], "train")


# -- natural partitioning per side ------------------------------------------------------------

def test_natural_partitioning_gives_one_client_per_list_on_each_side():
    train = load_corpus("spamassassin")["train"]
    train = train.select(np.flatnonzero(np.asarray(train["label"]) == 0))
    cfg = load_config(None, ["data.partition=natural", "data.domain_by=mailing_list",
                             f"data.target_domain={json.dumps(SMALL)}",
                             "data.target_clients=3", "data.num_clients=4",
                             "train.clients_per_round=2"]).data
    # The source side: every other ham message, lists under 10 rows merged into "other",
    # personal mail (no list) into its label-collection groups.
    with pytest.raises(PartitionError) as info:
        partition_domains(train, cfg, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.target_clients=3 and data.num_clients=4, but natural "
                              "partitioning by 'mailing_list' gives 3 target and ")
    source = int(message.split(" target and ")[1].split(" ")[0])
    assert f"set data.target_clients=3 and data.num_clients=3 (target only) or " \
           f"{3 + source} (with the source)" in message
    assert "target: forteana, iiu, social;" in message
    cfg.num_clients = 3 + source
    parts = partition_domains(train, cfg, seed=0)
    lists = np.asarray(["" if v is None else v for v in train["mailing_list"]])
    assert [set(lists[p]) for p in parts[:3]] == [{"forteana"}, {"iiu"}, {"social"}]
    assert not set(np.concatenate(parts[3:]).tolist()) & set(np.concatenate(parts[:3]).tolist())
    # A target-only run leaves the source out, whatever its groups.
    cfg.num_clients = 3
    alone = partition_domains(train, cfg, seed=0)
    assert len(alone) == 3
    for a, b in zip(alone, parts[:3], strict=True):
        np.testing.assert_array_equal(a, b)
    cfg.target_clients = cfg.num_clients = 5
    with pytest.raises(PartitionError, match=r"set data.target_clients=3 and "
                       r"data.num_clients=3 \(target only\)"):
        partition_domains(train, cfg, seed=0)


# -- what the LM takes and refuses ------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["fixed", "anneal"])
def test_the_lm_takes_two_domains_and_fixed_or_anneal_expansion(weighting):
    cfg = _lm(EXPAND % weighting)
    assert cfg.data.source_clients == 5 and cfg.plugins[0]["weighting"] == weighting
    from strategies.plugins import build_plugins

    (plugin,) = build_plugins(cfg)
    # Weights come from partition ids alone: nothing a row's label or a head gives.
    assert plugin.client_weight(1, 0) == 1.0 and plugin.client_weight(1, 3) == 1.0
    assert plugin.client_config(1, 3) == {}


@pytest.mark.parametrize("extra, reason", [
    ([EXPAND % "importance"], "population_expansion weighting='importance' reads a domain "
     "classifier on pooled features (tuning.domain_head), which task.kind='causal_lm' does not "
     "have; use weighting='fixed' or 'anneal'"),
    (['plugins=[{name = "el2n_pruning"}]'], "el2n_pruning scores each example by the error "
     "of its class prediction, and task.kind='causal_lm' has no classes"),
    ([EXPAND % "importance", "tuning.domain_head=true"], "weighting='importance'"),
])
def test_the_lm_refuses_importance_and_el2n_with_their_reason(extra, reason):
    with pytest.raises(ConfigError) as info:
        _lm(*extra)
    message = str(info.value)
    assert reason in message and "\n" not in message


def test_the_classifier_still_takes_importance_weighting():
    cfg = load_config(None, ["data.partition=iid", "privacy.sample.enabled=false",
                             "data.domain_by=collection", "data.target_domain=[\"set2\"]",
                             "data.num_clients=8", "data.target_clients=2",
                             "train.clients_per_round=2", "tuning.domain_head=true",
                             EXPAND % "importance"])
    assert cfg.plugins[0]["weighting"] == "importance"


def test_the_lm_experiments_load_and_expand_the_same_target():
    from fedtune.study.sweep import load_sweep

    base = load_config(ROOT / "experiments" / "lm_target_population.toml")
    assert base.task.kind == "causal_lm" and base.privacy.user.enabled
    assert base.data.source_clients == 0 and base.model.max_length <= 64
    assert 0 < base.train.eval_max_examples <= 64
    sweep = load_sweep(ROOT / "experiments" / "lm_expansion.toml")
    runs = {v.name: load_config(sweep.base, list(v.overrides)) for v in sweep.variants}
    only = [c for c in runs.values() if not c.plugins and c.privacy.user.enabled]
    expanded = [c for c in runs.values() if c.plugins and c.privacy.user.enabled]
    assert only and expanded
    for cfg in runs.values():
        assert cfg.data.target_values == base.data.target_values
        assert cfg.data.target_clients == base.data.target_clients
        assert cfg.train.eval_max_examples <= 64 and cfg.model.max_length <= 64
    assert all(c.data.num_clients > c.data.target_clients for c in expanded)
    epsilons = {c.privacy.user.target_epsilon for c in only}
    assert epsilons & {c.privacy.user.target_epsilon for c in expanded}


# -- the task and one run ---------------------------------------------------------------------

def _users(path: Path) -> Path:
    """Two small target users and two larger source users, each with its own vocabulary."""
    rng = np.random.default_rng(0)
    words = {"ann": ["garden", "roses", "soil"], "bo": ["tea", "cups", "kettle"],
             "cy": ["build", "patch", "merge", "review", "server"],
             "di": ["lunch", "meeting", "today", "tomorrow", "thanks"]}
    sizes = {"ann": 24, "bo": 24, "cy": 40, "di": 40}
    with open(path, "w") as fh:
        for user, size in sizes.items():
            for _ in range(size):
                text = " ".join(rng.choice(words[user], size=int(rng.integers(4, 12))))
                fh.write(json.dumps({"text": f"{user} {text}", "user": user}) + "\n")
    return path


def _llama(root: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.models.backbone import resolve_backbone_path
    from tests.test_causal_lm import CONFIGS

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS["llama"](len(tokenizer))).save_pretrained(
        root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return root / "llama"


def _sets(folder: Path, data: Path) -> list[str]:
    return [f'model.backbone="{folder}"', "task.kind=causal_lm", "model.max_length=16",
            "data.corpus=hf", f'data.options={{path="json", data_files="{data}", '
            'test_fraction=0.25}', "data.partition=natural", "data.by=user",
            "data.domain_by=user", 'data.target_domain=["ann", "bo"]', "data.target_clients=2",
            "data.num_clients=4", "tuning.method=lora", "privacy.sample.enabled=false",
            "train.clients_per_round=2", "train.local_steps=1", "train.batch_size=4",
            "task.generation_examples=0"]


def test_validation_and_test_rows_are_the_target_users_only(tmp_path):
    from fedtune.task.task import get_task

    folder, data = _llama(tmp_path), _users(tmp_path / "mail.jsonl")
    cfg = load_config(None, [*_sets(folder, data), f'runtime.cache_dir="{tmp_path / "c"}"'])
    task = get_task(cfg)
    assert len(task.partitions) == 4 and task.validation is not None

    def first_word(ids) -> set[str]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        return {tokenizer.decode(r[:3], skip_special_tokens=True).split()[0] for r in ids}

    assert first_word(task.validation.input_ids) <= {"ann", "bo"}
    assert first_word(task.test.input_ids) <= {"ann", "bo"}
    assert first_word(task.train.input_ids[np.concatenate(task.partitions[2:])]) == {"cy", "di"}


@pytest.mark.slow
def test_an_lm_expansion_run_reports_the_target_lists_perplexity_under_user_dp(tmp_path):
    folder, data = _llama(tmp_path), _users(tmp_path / "mail.jsonl")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fedtune.cli", "run", "--out", str(out)]
    for item in [*_sets(folder, data), "train.rounds=2", "train.lr=1.0",
                 "privacy.user.enabled=true", "privacy.user.target_epsilon=8",
                 "privacy.user.clip_norm=1.0", "simulation.num_cpus=1",
                 'plugins=[{name = "population_expansion", weighting = "anneal", lam = 0.5, '
                 'anneal_rounds = 1}]']:
        args += ["--set", item]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["val_perplexity"] == pytest.approx(math.exp(record["val_loss"]))
        assert record["val_accuracy"] is None and 0 < record["epsilon_user"] <= 8
        assert record["expansion"]["weighting"] == "anneal"
    # Anneal over 2 rounds: the source counts lam = 0.5 in round 1, nothing in round 2.
    assert [r["expansion"]["source_weight"] for r in rounds] == [0.5, 0.0]
    # The cohort's make-up is the curator's under user-level DP (null in the release).
    from fedtune.run.curator_log import read_curator

    assert rounds[1]["expansion"]["source_clients"] is None
    assert read_curator(out)[1]["expansion"]["source_clients"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_domain"] == "user in [ann, bo]"
    assert (summary["target_clients"], summary["source_clients"]) == (2, 2)
    best = min(rounds, key=lambda r: r["val_perplexity"])
    assert summary["best_round"] == best["round"]
    assert summary["best_val_perplexity"] == best["val_perplexity"]
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]))
    assert summary["epsilon_user"] == rounds[-1]["epsilon_user"]
