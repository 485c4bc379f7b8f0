"""End to end after a causal-LM `fedtune run` (tiny random Llama, three users, DP-SGD; the run
of tests/test_lm_e2e.py): `fedtune export` leaves a PEFT adapter that loads on the same base
with peft's own API and gives fedtune's logits, `fedtune predict --prompt` prints a greedy
generation, and `fedtune report` draws perplexity, not accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedtune.run.export import load_tuned
from tests.test_lm_e2e import lm_run  # noqa: F401 (the module-scoped fedtune run)


@pytest.mark.slow
@pytest.mark.long  # the README's command keeps one LM run (test_lm_e2e); CI runs these after it
def test_a_finished_lm_run_exports_predicts_and_reports(lm_run, tmp_path, cli):  # noqa: F811
    from peft import PeftModel

    run, _ = lm_run
    result = cli("export", str(run), str(tmp_path / "export"))
    assert result.code == 0, result.output
    export = tmp_path / "export"
    manifest = json.loads((export / "fedtune.json").read_text())
    assert manifest["task_kind"] == "causal_lm" and manifest["peft_adapter"] == "adapter"
    assert manifest["test_perplexity"] == json.loads(
        (run / "summary.json").read_text())["test_perplexity"]
    assert manifest["epsilon_sample"] is not None
    tuned = load_tuned(export)
    enc = tuned.tokenizer(["alice meeting today the build", "bob"], padding="max_length",
                          max_length=12, return_tensors="pt")
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
        theirs = PeftModel.from_pretrained(base, str(export / "adapter")).eval()(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        ours = tuned.model(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    result = cli("predict", str(export), "--prompt", "alice meeting today",
                 "--max-new-tokens", "4")
    assert result.code == 0, result.output
    [line] = result.stdout.strip().splitlines()
    expected = tuned.generate(["alice meeting today"], max_new_tokens=4)[0]
    assert line == f"alice meeting today\t{' '.join(expected.split())}"

    result = cli("report", str(run), "--out", str(tmp_path / "report"))
    assert result.code == 0, result.output
    assert "final test perplexity (mean +- std)" in result.stdout
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "perplexity_vs_bytes.png", "perplexity_vs_epsilon.png", "perplexity_vs_round.png",
        "report.md"]
