"""Export and predict: a saved tuned state rebuilds the same model, and anything that does not
belong together is refused by name."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedtune.config import load_config
from fedtune.export import ExportError, export_run, load_tuned, save_tuned_state
from fedtune.models import load_backbone
from fedtune.predict_input import PredictInputError, read_texts
from fedtune.task import model_spec
from fedtune.tuning import build_tuned_model

LABELS = ("ham", "spam")
TEXTS = ["Win a FREE cruise now!!! Click here", "Re: patch for the build script, see below",
         "Meeting moved to 3pm"]


def _saved_run(folder, method, **overrides):
    """A run folder as the server leaves it: config.toml + a perturbed final state."""
    sets = [f"tuning.method={method}", "model.max_length=32", "tuning.slash_size=64",
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
    other = load_config(None, ["tuning.method=lora", "model.max_length=32", "tuning.lora_r=4"])
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
