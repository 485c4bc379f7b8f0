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
from fedtune.data.predict_input import PredictInputError
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
    with pytest.raises(PredictInputError, match="prompt 2 .* model.max_length=16: shorten"):
        tuned.generate(["word " * 14, "word " * 15])  # continued only whole: refused, not cut
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


def test_generate_keeps_each_forwards_logits_within_the_evaluation_budget(
        tmp_path, lm_folders, monkeypatch):
    """A generation forward of `fedtune predict` holds at most LOGITS_BUDGET logits (rows x
    positions x vocabulary), as evaluation's do: the default batch (train.eval_batch_size)
    of long prompts on a large vocabulary would otherwise ask for gigabytes per forward."""
    from fedtune.task import lm

    _saved_run(tmp_path / "run", lm_folders["llama"], "lora")
    tuned = load_tuned(tmp_path / "run")
    vocab = int(tuned.model.backbone.config.vocab_size)
    new_tokens = 4
    widest = max(len(tuned.prompt_ids(p)) for p in PROMPTS) + new_tokens
    budget = vocab * widest  # room for one prompt at its widest, not for the three at once
    monkeypatch.setattr(lm, "LOGITS_BUDGET", budget)
    seen: list[tuple[int, ...]] = []
    handle = tuned.model.register_forward_hook(
        lambda _m, _i, out: seen.append(tuple(out.shape)))
    try:
        texts = tuned.generate(PROMPTS, max_new_tokens=new_tokens)  # no batch size given
    finally:
        handle.remove()
    assert seen
    over = [s for s in seen if s[0] * s[1] * s[2] > budget]
    assert not over, (f"{len(over)} of {len(seen)} forwards held more than LOGITS_BUDGET="
                      f"{budget} logits, e.g. {over[0]} (rows, positions, vocabulary)")
    # The same generations as one prompt at a time.
    expected = greedy_continue(tuned.model, tuned.tokenizer,
                               [tuned.prompt_ids(p) for p in PROMPTS], new_tokens, 1)
    assert texts == [tuned.tokenizer.decode(e, skip_special_tokens=True) for e in expected]


def test_an_edited_backbone_config_is_refused_or_predicts_the_same(tmp_path, lm_folders):
    """An exported LM's hashes cover every value that changes its generations: a backbone
    folder whose config.json changed (rms_norm_eps here; no weight moves) is refused, or
    predicts the same."""
    import shutil

    from fedtune.models.backbone import load_backbone

    folder = tmp_path / "llama"
    shutil.copytree(lm_folders["llama"], folder)
    run = tmp_path / "run"
    _saved_run(run, str(folder), "lora")
    ids = torch.tensor([[101, 2023, 3857, 3478, 2153, 102]])
    mask = torch.ones_like(ids)
    load_backbone.cache_clear()
    with torch.no_grad():
        before = load_tuned(run).model(ids, mask)
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1.0
    (folder / "config.json").write_text(json.dumps(config))
    load_backbone.cache_clear()  # a new process: the edited folder is read again
    try:
        try:
            tuned = load_tuned(run)
        except ExportError as exc:
            assert "config" in str(exc) and "\n" not in str(exc)
            return  # refused: the invariant holds
        with torch.no_grad():
            after = tuned.model(ids, mask)
    finally:
        load_backbone.cache_clear()
    assert torch.allclose(before, after), (
        "the backbone's config.json changed, its logits moved by "
        f"{float((before - after).abs().max()):.3g}, and the same export loaded without a word")


def test_a_prompt_longer_than_max_length_is_not_silently_continued_from_its_middle(
        tmp_path, lm_folders, cli):
    """`fedtune predict` on an LM either continues a prompt from its end, or says (refusal
    or note naming model.max_length) that it cut the prompt: never prints a continuation of
    the prompt's first max_length tokens next to the whole prompt."""
    run = tmp_path / "run"
    _saved_run(run, lm_folders["llama"], "lora")  # model.max_length = 16
    prompt = " ".join(["the build failed again"] * 10) + " and then the server"
    tuned = load_tuned(run)
    assert len(tuned.prompt_ids(prompt)) < len(tuned.tokenizer(prompt)["input_ids"]) - 1
    out = tmp_path / "gen.jsonl"
    result = cli("predict", str(run), "--prompt", prompt, "--max-new-tokens", "3",
                 "--out", str(out))
    if "max_length" in result.output:  # refused in one line, naming the key
        assert result.code == 2 and len(result.output.strip().splitlines()) == 1
        assert "model.max_length=16" in result.output and not out.exists()
        return
    assert result.code == 0, result.output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prompt"] == prompt
    pytest.fail(f"the prompt's {len(tuned.tokenizer(prompt)['input_ids'])} tokens were cut to "
                f"model.max_length=16 without a word; {row['generation']!r} continues its "
                "first 15 tokens, printed next to the whole prompt")


def test_the_exported_adapter_holds_the_verified_weights(tmp_path, lm_folders):
    """The PEFT adapter an export ships holds the values of the verified final state (a
    run folder's adapter/ edited after the run is refused or rewritten, never shipped under
    the export's hashes)."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    _saved_run(run, lm_folders["llama"], "lora")
    weights = run / "adapter" / "adapter_model.safetensors"
    tampered = {k: v * 100.0 for k, v in load_file(str(weights)).items()}
    save_file(tampered, str(weights), metadata={"format": "pt"})
    try:
        out = export_run(run, tmp_path / "export")
    except ExportError:
        return
    shipped = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert not any(torch.equal(shipped[k], tampered[k]) for k in tampered), (
        "the export ships the edited adapter; fedtune.json's hashes cover final_state only")


def test_export_never_copies_a_file_a_link_in_the_run_folder_points_to(tmp_path, lm_folders):
    """`fedtune export` puts nothing from outside the run folder into the export, whatever
    links the run's adapter/ holds."""
    run = tmp_path / "run"
    _saved_run(run, lm_folders["llama"], "lora")
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- not for sharing\n")
    (run / "adapter" / "notes.txt").symlink_to(secret)
    try:
        out = export_run(run, tmp_path / "export")
    except ExportError:
        return
    leaked = [p for p in out.rglob("*") if p.is_file() and "not for sharing" in p.read_text(
        errors="replace")]
    assert not leaked, f"the export holds {leaked[0].relative_to(out)}: a copy of {secret}"
    assert json.loads((out / "fedtune.json").read_text())["peft_adapter"] == "adapter"


def test_generation_progress_counts_token_positions_up_to_its_bound(tmp_path, lm_folders):
    """`generate`'s progress is in token positions (no KV cache: each new token reruns the
    sequence), against the bound `generation_work` states up front, ending at it."""
    from fedtune.run.tuned_lm import generation_work

    _saved_run(tmp_path / "run", lm_folders["llama"], "prompt")  # 3 soft-prompt tokens
    tuned = load_tuned(tmp_path / "run")
    reports: list[tuple[int, int]] = []
    tuned.generate(PROMPTS, max_new_tokens=5, batch_size=2,
                   on_progress=lambda done, total: reports.append((done, total)))
    rows = [tuned.prompt_ids(p) for p in PROMPTS]
    total = generation_work(rows, 5, 3)
    assert total == sum(5 * (3 + len(r)) + 4 + 3 + 2 + 1 for r in rows)
    assert reports and {t for _, t in reports} == {total}
    done = [d for d, _ in reports]
    assert done == sorted(done) and done[-1] == total


def test_one_prompt_whose_forward_passes_the_logits_budget_is_refused(
        tmp_path, lm_folders, monkeypatch):
    """Invariant: no generation forward holds more than LOGITS_BUDGET logits: a prompt whose
    own forward would is refused in one line (as evaluation refuses such a row), naming
    --max-new-tokens and the budget."""
    from fedtune.task import lm

    _saved_run(tmp_path / "run", lm_folders["llama"], "lora")
    tuned = load_tuned(tmp_path / "run")
    vocab = int(tuned.model.backbone.config.vocab_size)
    prompt = "the build failed again"
    # One prompt's first forward (its own tokens, before any new one) already passes it.
    monkeypatch.setattr(lm, "LOGITS_BUDGET", vocab * len(tuned.prompt_ids(prompt)) - 1)
    seen: list[tuple[int, ...]] = []
    handle = tuned.model.register_forward_hook(
        lambda _m, _i, out: seen.append(tuple(out.shape)))
    try:
        tuned.generate([prompt], max_new_tokens=4)
    except PredictInputError as exc:
        assert not seen, "refused only after a forward ran"
        assert "--max-new-tokens" in str(exc) and "LOGITS_BUDGET" in str(exc)
        assert "\n" not in str(exc)
        return  # refused before any forward: the invariant holds
    finally:
        handle.remove()
    over = [s for s in seen if s[0] * s[1] * s[2] > lm.LOGITS_BUDGET]
    assert not over, (f"{len(over)} of {len(seen)} forwards held more than LOGITS_BUDGET="
                      f"{lm.LOGITS_BUDGET} logits, e.g. {over[0]}: a lone prompt is never cut "
                      "or refused")


def test_an_export_whose_backbone_tokenizer_now_encodes_otherwise_is_refused(
        tmp_path, lm_folders):
    """Invariant: load_tuned refuses (or predicts the same as before) once the backbone
    folder's tokenizer_config.json changes how a prompt is tokenized."""
    import shutil

    from fedtune.models.backbone import load_backbone

    prompt = "the build failed again [SEP] see you tomorrow"
    folder = tmp_path / "llama"
    shutil.copytree(lm_folders["llama"], folder)
    run = tmp_path / "run"
    _saved_run(run, str(folder), "lora")
    load_backbone.cache_clear()
    before = load_tuned(run)
    ids_before = before.prompt_ids(prompt)
    said_before = before.generate([prompt], max_new_tokens=4)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["split_special_tokens"] = True
    path.write_text(json.dumps(config))
    load_backbone.cache_clear()  # a new process: the folder is read again
    try:
        after = load_tuned(run)
    except ExportError as exc:
        assert "tokenizer" in str(exc) and "\n" not in str(exc)
        return
    finally:
        load_backbone.cache_clear()
    ids_after = after.prompt_ids(prompt)
    assert ids_after == ids_before, (
        f"the export loaded with the same prediction hash, but the prompt is now "
        f"{ids_after} not {ids_before} (generations {said_before} then "
        f"{after.generate([prompt], max_new_tokens=4)})")
