"""Export and predict for a causal-LM run (`task.kind = "causal_lm"`), on tiny random Llama and
GPT-2 decoders saved to folders (the packaged MiniLM tokenizer stands in for theirs): the
exported adapter loads on the same base with peft's own API and gives fedtune's logits,
`fedtune predict` prints greedy generations for --prompt and for a file, and a state whose
task kind, max_length or method setting was edited is refused by its hashes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedtune.config import load_config
from fedtune.run.export import ExportError, export_run, kind_backbone, load_tuned, save_tuned_state
from fedtune.run.tuned_lm import TunedLM, appended_tokens
from fedtune.task.generation import greedy_continue
from fedtune.task.task import model_spec
from fedtune.tuning import build_tuned_model
from tests.lm_fixtures import CONFIGS

PROMPTS = ["the build failed again", "see you tomorrow at the meeting", "thanks"]


def _cfg(folder: str, method: str, *sets: str):
    return load_config(None, [f'model.backbone="{folder}"', "task.kind=causal_lm",
                              "data.partition=iid", "model.max_length=16",
                              f"tuning.method={method}", "tuning.prompt.length=3",
                              "tuning.lora.r=4", *sets])


def _saved_run(run, folder: str, method: str):
    """A causal-LM run folder as the server leaves it: config.toml and a perturbed final state
    (LoRA's B starts at zero: perturbed, the adapter changes the logits)."""
    cfg = _cfg(folder, method)
    backbone = kind_backbone(cfg)
    model = build_tuned_model(backbone, cfg.tuning, 0, seed=cfg.seed, kind="causal_lm")
    spec = model_spec(model, backbone, cfg, 0)
    gen = torch.Generator().manual_seed(1)
    state = {k: v.detach() + 0.5 * torch.randn(v.shape, generator=gen)
             for k, v in model.trainable_state().items()}
    run.mkdir(parents=True)
    (run / "config.toml").write_text(cfg.to_toml())
    save_tuned_state(run, model, spec, state, ())
    (run / "summary.json").write_text(json.dumps({"test_perplexity": 123.4,
                                                  "final_accuracy": None}))
    return state


def _batch(tokenizer):
    enc = tokenizer(PROMPTS, padding="max_length", max_length=12, truncation=True,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_the_exported_adapter_loads_with_peft_and_gives_fedtunes_logits(
        tmp_path, lm_folders, family, method):
    from peft import PeftModel

    _saved_run(tmp_path / "run", lm_folders[family], method)
    out = export_run(tmp_path / "run", tmp_path / "export")
    manifest = json.loads((out / "fedtune.json").read_text())
    assert manifest["task_kind"] == "causal_lm" and manifest["method"] == method
    assert manifest["peft_adapter"] == "adapter" and manifest["label_names"] == []
    assert manifest["test_perplexity"] == 123.4 and manifest["max_length"] == 16
    tuned = load_tuned(out)
    assert isinstance(tuned, TunedLM)
    ids, mask = _batch(tuned.tokenizer)
    with torch.no_grad():
        ours = tuned.model(ids, mask)
        base = AutoModelForCausalLM.from_pretrained(lm_folders[family]).eval()
        untuned = base(input_ids=ids, attention_mask=mask).logits
        peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    if method == "prompt":  # peft's logits start with the virtual tokens': fedtune drops them
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 3
        theirs = theirs[:, 3:]
    assert ours.shape == theirs.shape == untuned.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - untuned).abs().max() > 1e-3  # the adapter is really applied


@pytest.mark.parametrize("method", ["lora", "prompt", "slash"])
def test_generate_is_greedy_decoding_of_the_tuned_model(tmp_path, lm_folders, method):
    _saved_run(tmp_path / "run", lm_folders["llama"], method)
    tuned = load_tuned(tmp_path / "run")
    # The MiniLM tokenizer appends [SEP] to a text: a prompt goes on without it.
    assert appended_tokens(tuned.tokenizer) == 1
    ids = tuned.prompt_ids(PROMPTS[0])
    assert ids[0] == tuned.tokenizer.cls_token_id and tuned.tokenizer.sep_token_id not in ids
    assert len(tuned.prompt_ids("word " * 100)) == 16 - 1  # max_length, minus the [SEP]
    texts = tuned.generate(PROMPTS, max_new_tokens=6, batch_size=2)
    expected = greedy_continue(tuned.model, tuned.tokenizer,
                               [tuned.prompt_ids(p) for p in PROMPTS], 6, 1)
    assert texts == [tuned.tokenizer.decode(e, skip_special_tokens=True) for e in expected]
    assert any(texts)


def test_predict_prints_generations_for_prompts_and_for_a_file(tmp_path, lm_folders, cli):
    _saved_run(tmp_path / "run", lm_folders["gpt2"], "lora")
    out = export_run(tmp_path / "run", tmp_path / "export")
    expected = load_tuned(out).generate(PROMPTS[:2], max_new_tokens=5)
    result = cli("predict", str(out), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--max-new-tokens", "5")
    assert result.code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines == [f"{p}\t{' '.join(g.split())}" for p, g in zip(PROMPTS[:2], expected,
                                                                    strict=True)]
    # A file: the text column only (a label column means nothing to a language model).
    data = tmp_path / "prompts.csv"
    data.write_text(f"text,label\n{PROMPTS[0]},ham\n{PROMPTS[1]},spam\n")
    result = cli("predict", str(out), "--file", str(data), "--max-new-tokens", "5")
    assert result.code == 0, result.output
    assert result.stdout.strip().splitlines() == lines
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p, "user": "u"}) + "\n" for p in PROMPTS[:2]))
    result = cli("predict", str(out), "--file", str(jsonl), "--max-new-tokens", "5",
                 "--out", str(tmp_path / "gen.jsonl"))
    assert result.code == 0, result.output
    rows = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": p, "generation": g} for p, g in zip(PROMPTS[:2], expected,
                                                                    strict=True)]


@pytest.mark.parametrize("args, needle", [
    (["--text", "hello"], "give its inputs with --prompt, not --text"),
    (["--prompt", "hello", "--max-new-tokens", "0"], "--max-new-tokens must be an integer"),
    (["--prompt", "hello", "--max-new-tokens", "60"], "exceed the model's 64 positions"),
])
def test_predict_refuses_bad_lm_input_in_one_line(tmp_path, lm_folders, cli, args, needle):
    _saved_run(tmp_path / "run", lm_folders["gpt2"], "prompt")
    result = cli("predict", str(tmp_path / "run"), *args)
    assert result.code == 2 and needle in result.output
    assert len(result.output.strip().splitlines()) == 1


def _edit_config(run, old: str, new: str) -> None:
    config = run / "config.toml"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


@pytest.mark.parametrize("old, new, needle", [
    ("max_length = 16", "max_length = 8", "max_length changed since the run saved"),
    # The spec hash binds the method's table; the prediction hash binds it as well.
    ("alpha = 16", "alpha = 64", "do not belong together"),
    ('kind = "causal_lm"', 'kind = "classification"', "task_kind changed since the run saved"),
])
def test_a_tampered_export_is_refused_by_its_hashes(tmp_path, lm_folders, old, new, needle):
    _saved_run(tmp_path / "run", lm_folders["gpt2"], "lora")
    out = export_run(tmp_path / "run", tmp_path / "export")
    load_tuned(out)
    _edit_config(out, old, new)
    with pytest.raises(ExportError) as info:
        load_tuned(out)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_prediction_hash_binds_the_task_kind(tmp_path, lm_folders):
    from safetensors import safe_open

    _saved_run(tmp_path / "run", lm_folders["gpt2"], "prompt")
    with safe_open(str(tmp_path / "run" / "final_state.safetensors"), framework="pt") as fh:
        settings = json.loads(fh.metadata()["prediction_settings"])
    assert settings["task_kind"] == "causal_lm" and settings["max_length"] == 16
    assert settings["tuning"]["prompt"]["length"] == 3
