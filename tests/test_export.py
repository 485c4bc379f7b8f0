"""Export and predict: a saved tuned state rebuilds the same model, and anything that does not
belong together is refused by name."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedtune.config import load_config
from fedtune.data.predict_input import PredictInputError, read_texts
from fedtune.models import load_backbone
from fedtune.run.export import ExportError, export_run, load_tuned, save_tuned_state
from fedtune.task.task import model_spec
from fedtune.tuning import build_tuned_model

LABELS = ("ham", "spam")
TEXTS = ["Win a FREE cruise now!!! Click here", "Re: patch for the build script, see below",
         "Meeting moved to 3pm"]


def _saved_run(folder, method, **overrides):
    """A run folder as the server leaves it: config.toml + a perturbed final state."""
    sets = [f"tuning.method={method}", "model.max_length=32", "tuning.slash.size=64",
            *[f"{k}={v}" for k, v in overrides.items()]]
    cfg = load_config(None, sets)
    backbone = load_backbone(cfg.model.backbone)
    model = build_tuned_model(backbone, cfg.tuning, len(LABELS), seed=cfg.seed)
    spec = model_spec(model, backbone, cfg, len(LABELS))
    gen = torch.Generator().manual_seed(1)
    state = {k: v.detach() + 0.05 * torch.randn(v.shape, generator=gen)
             for k, v in model.trainable_state().items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(cfg.to_toml())
    save_tuned_state(folder, model, spec, state, LABELS)
    return model, state


@pytest.mark.parametrize("method", ["prompt", "lora", "slash", "bitfit"])
def test_loaded_model_gives_the_trained_models_outputs(tmp_path, method):
    model, state = _saved_run(tmp_path / "run", method)
    with torch.no_grad():
        for name, tensor in state.items():
            model.get_parameter(name).copy_(tensor)
    tuned = load_tuned(tmp_path / "run")
    probs = tuned.predict_proba(TEXTS, batch_size=2)
    from fedtune.data import tokenize_texts

    tok = tokenize_texts(TEXTS, tuned.tokenizer, 32)
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(tok["input_ids"].astype(np.int64)),
                                       torch.from_numpy(tok["attention_mask"].astype(np.int64))),
                                 -1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert tuned.label_names == LABELS


def test_export_is_self_contained_and_loads_the_same(tmp_path):
    _saved_run(tmp_path / "run", "lora")
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"final_accuracy": 0.9}))
    out = export_run(tmp_path / "run", tmp_path / "export")
    manifest = json.loads((out / "fedtune.json").read_text())
    assert manifest["method"] == "lora" and manifest["peft_adapter"] == "adapter"
    assert manifest["label_names"] == list(LABELS) and manifest["test_accuracy"] == 0.9
    assert (out / "adapter" / "adapter_config.json").exists()
    a = load_tuned(tmp_path / "run").predict_proba(TEXTS)
    b = load_tuned(out).predict_proba(TEXTS)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_run(tmp_path / "run", out)


def test_state_and_config_that_do_not_belong_together_are_refused(tmp_path):
    _saved_run(tmp_path / "run", "lora")
    other = load_config(None, ["tuning.method=lora", "model.max_length=32", "tuning.lora.r=4"])
    (tmp_path / "run" / "config.toml").write_text(other.to_toml())
    with pytest.raises(ExportError, match="do not belong together"):
        load_tuned(tmp_path / "run")


def test_missing_or_foreign_files_are_named(tmp_path):
    with pytest.raises(ExportError, match="has no config.toml"):
        load_tuned(tmp_path)
    _saved_run(tmp_path / "run", "prompt")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "run" / "final_state.safetensors"))
    with pytest.raises(ExportError, match="is not a fedtune-tuned-state/1 file"):
        load_tuned(tmp_path / "run")


def test_read_texts_formats_and_errors(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("first\n\nsecond\n")
    assert read_texts(plain, LABELS) == (["first", "second"], None)
    good = tmp_path / "l.jsonl"
    good.write_text('{"text": "a", "label": "spam"}\n{"text": "b", "label": 0}\n')
    assert read_texts(good, LABELS) == (["a", "b"], [1, 0])
    for body, message in [('{"text": "a", "label": "eggs"}', "label 'eggs' is neither"),
                          ('{"txt": "a"}', 'expected an object with a "text"'),
                          ("not json", "not JSON"),
                          ('{"text": "a", "label": 1}\n{"text": "b"}', "1 of 2 lines")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body + "\n")
        with pytest.raises(PredictInputError, match=message):
            read_texts(bad, LABELS)


# --- content hash, non-finite state, output folder, privacy statement ------------------------

def _rewrite_state(folder, change):
    """Edit the saved tensors in place, keeping the file's metadata (hashes included)."""
    from safetensors import safe_open

    path = folder / "final_state.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
    change(state)
    save_file(state, str(path), metadata=meta)


def test_edited_tensor_values_are_refused_by_load_and_export(tmp_path):
    # The spec hash covers names, shapes and the config: edited values loaded and were
    # exported with the original run's accuracy and epsilon.
    _saved_run(tmp_path / "run", "prompt")

    def nudge(state):
        name = sorted(state)[0]
        state[name] = state[name] + 1e-3

    _rewrite_state(tmp_path / "run", nudge)
    with pytest.raises(ExportError) as info:
        load_tuned(tmp_path / "run")
    assert "content hash" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ExportError, match="content hash"):
        export_run(tmp_path / "run", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_non_finite_state_is_refused_even_with_a_matching_hash(tmp_path):
    # A diverged run saves NaN tensors through the server's own save: "nan" predictions.
    model, state = _saved_run(tmp_path / "run", "lora")
    cfg = load_config(tmp_path / "run" / "config.toml")
    backbone = load_backbone(cfg.model.backbone)
    spec = model_spec(model, backbone, cfg, len(LABELS))
    bad = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    save_tuned_state(tmp_path / "run", model, spec, bad, LABELS)
    with pytest.raises(ExportError, match=r"non-finite values \(NaN or inf\)"):
        load_tuned(tmp_path / "run")


def test_a_state_without_content_hash_is_refused(tmp_path):
    _saved_run(tmp_path / "run", "prompt")
    path = tmp_path / "run" / "final_state.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k != "content_sha256"}
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ExportError, match="has no content hash"):
        load_tuned(tmp_path / "run")


def test_export_into_a_file_is_one_line(tmp_path):
    _saved_run(tmp_path / "run", "prompt")
    target = tmp_path / "model.bin"
    target.write_text("x")
    with pytest.raises(ExportError, match="model.bin is a file, not a folder"):
        export_run(tmp_path / "run", target)


def test_reproducible_noise_runs_export_the_seeded_noise_note_with_every_epsilon(tmp_path):
    from fedtune.config import load_config
    from fedtune.config.user_unit import user_unit
    from fedtune.privacy.randomness import SECRET_NOISE_NOTE, SEEDED_NOISE_NOTE
    from fedtune.run.epsilon_marks import conditional_disclosures

    for name, seeded in (("seeded", True), ("secret", False)):
        run = tmp_path / name
        _saved_run(run, "prompt", **{"privacy.reproducible_noise": str(seeded).lower(),
                                     "privacy.user.enabled": "true"})
        (run / "summary.json").write_text(json.dumps(
            {"final_accuracy": 0.8, "epsilon_sample": 2.5, "epsilon_user": 1.5,
             "delta": 1e-5}))
        manifest = json.loads((export_run(run, tmp_path / f"{name}-export")
                               / "fedtune.json").read_text())
        note = SEEDED_NOISE_NOTE if seeded else SECRET_NOISE_NOTE
        assert manifest["epsilon_sample"] == 2.5 and manifest["epsilon_user"] == 1.5
        # The sample level's note ends with what an own-data node sends at discovery.
        assert manifest["epsilon_sample_note"] == "; ".join(
            [note, *conditional_disclosures(load_config(run / "config.toml"))])
        # epsilon_user's note also names its unit (a user or, here, a client's shard).
        unit = user_unit(load_config(run / "config.toml"))
        assert "shard" in unit
        assert manifest["epsilon_user_note"] == f"{note}; {unit}"
        assert manifest["privacy"]["reproducible_noise"] is seeded
        assert manifest["privacy"]["noise"] == note


def test_dp_off_exports_null_epsilons_without_notes(tmp_path):
    _saved_run(tmp_path / "run", "prompt", **{"privacy.sample.enabled": "false"})
    (tmp_path / "run" / "summary.json").write_text(json.dumps(
        {"final_accuracy": 0.8, "epsilon_sample": None, "epsilon_user": None, "delta": None}))
    manifest = json.loads((export_run(tmp_path / "run", tmp_path / "export")
                           / "fedtune.json").read_text())
    assert manifest["epsilon_sample"] is None and manifest["epsilon_sample_note"] is None
    assert manifest["epsilon_user"] is None and manifest["epsilon_user_note"] is None


@pytest.mark.parametrize("smashed_dp", [False, True])
def test_split_exports_say_whether_smashed_data_was_in_clear(tmp_path, smashed_dp):
    _saved_run(tmp_path / "run", "prompt", **{"split.enabled": "true",
                                              "split.smashed_dp.enabled": str(smashed_dp).lower()})
    manifest = json.loads((export_run(tmp_path / "run", tmp_path / "export")
                           / "fedtune.json").read_text())
    smashed = manifest["privacy"]["smashed_data"]
    if smashed_dp:
        assert smashed.startswith("clipped and noised on the client")
    else:
        assert smashed.startswith("in clear")
        assert "no epsilon covers the raw training data against the server" in smashed


def test_unsplit_exports_have_no_smashed_data_line(tmp_path):
    _saved_run(tmp_path / "run", "prompt")
    manifest = json.loads((export_run(tmp_path / "run", tmp_path / "export")
                           / "fedtune.json").read_text())
    assert manifest["privacy"]["smashed_data"] is None


# --- the prediction hash: labels, max_length and the rest are bound (issue 27 #6) ------------

def _rewrite_metadata(folder, change):
    from safetensors import safe_open

    path = folder / "final_state.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
    change(meta)
    save_file(state, str(path), metadata=meta)


def test_reversed_label_names_are_refused_by_load_and_export(tmp_path):
    # Reversing them turned accuracy 0.9336 into 0.0664, with every hash still matching.
    _saved_run(tmp_path / "run", "prompt")
    assert load_tuned(tmp_path / "run").label_names == LABELS
    _rewrite_metadata(tmp_path / "run", lambda meta: meta.update(
        label_names=json.dumps(list(reversed(LABELS)))))
    with pytest.raises(ExportError) as info:
        load_tuned(tmp_path / "run")
    message = str(info.value)
    assert "label_names changed since the run saved this state" in message
    assert "\n" not in message
    with pytest.raises(ExportError, match="label_names changed"):
        export_run(tmp_path / "run", tmp_path / "export")


@pytest.mark.parametrize("max_length", [8, 512])
def test_an_edited_max_length_is_refused(tmp_path, max_length):
    # 32 -> 8 changed 17 % of predictions; 512 ended in a raw RuntimeError.
    _saved_run(tmp_path / "run", "prompt")
    config = tmp_path / "run" / "config.toml"
    config.write_text(config.read_text().replace("max_length = 32",
                                                 f"max_length = {max_length}"))
    assert load_config(config).model.max_length == max_length
    with pytest.raises(ExportError, match="max_length changed since the run saved"):
        load_tuned(tmp_path / "run")


def test_an_edited_seed_or_a_replaced_binding_is_refused(tmp_path):
    _saved_run(tmp_path / "run", "prompt")
    config = tmp_path / "run" / "config.toml"
    config.write_text(config.read_text().replace("seed = 0", "seed = 7"))
    with pytest.raises(ExportError, match="seed changed"):
        load_tuned(tmp_path / "run")
    _saved_run(tmp_path / "run2", "prompt")
    _rewrite_metadata(tmp_path / "run2", lambda meta: meta.pop("prediction_sha256"))
    with pytest.raises(ExportError, match="has no prediction hash"):
        load_tuned(tmp_path / "run2")


def test_the_export_manifest_carries_the_prediction_hash(tmp_path):
    _saved_run(tmp_path / "run", "prompt")
    manifest = json.loads((export_run(tmp_path / "run", tmp_path / "export")
                           / "fedtune.json").read_text())
    assert len(manifest["prediction_sha256"]) == 64


def test_a_lora_export_ships_the_verified_adapter_and_no_linked_file(tmp_path):
    """The export's adapter/ is written from the verified state: an adapter edited after the
    run, or a link planted in it, never reaches the export (a classifier here; the causal
    LM's in tests/test_lm_export.py)."""
    from safetensors.torch import load_file

    _saved_run(tmp_path / "run", "lora")
    adapter = tmp_path / "run" / "adapter"
    original = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v * 100.0 for k, v in original.items()},
              str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    secret = tmp_path / "secret.txt"
    secret.write_text("not for sharing\n")
    (adapter / "notes.txt").symlink_to(secret)
    out = export_run(tmp_path / "run", tmp_path / "export")
    shipped = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert shipped.keys() == original.keys()
    assert all(torch.equal(shipped[k], original[k]) for k in original)
    assert not (out / "adapter" / "notes.txt").exists()
    assert not any("not for sharing" in p.read_text(errors="replace")
                   for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["config.toml", "final_state.safetensors", "summary.json"])
def test_a_run_file_that_is_a_link_is_refused_by_export(tmp_path, name):
    _saved_run(tmp_path / "run", "prompt")
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"final_accuracy": 0.9}))
    real = tmp_path / "elsewhere" / name
    real.parent.mkdir()
    (tmp_path / "run" / name).rename(real)
    (tmp_path / "run" / name).symlink_to(real)
    with pytest.raises(ExportError) as info:
        export_run(tmp_path / "run", tmp_path / "export")
    assert f"{name} is a symbolic link" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "export").exists()
