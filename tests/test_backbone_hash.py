"""A backbone's hash names the model that computes the outputs: its weights and every
config.json value that changes them (an edited rms_norm_eps or layer_norm_epsilon moves the
logits without moving a weight), not where the folder lies or which library version wrote
it. Saved states, exports and deltas carry this hash, so an edited backbone is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fedtune.models.backbone import load_backbone


@pytest.fixture(autouse=True)
def _fresh_loads():
    load_backbone.cache_clear()  # each load below reads its folder again, as a new process
    yield
    load_backbone.cache_clear()


def _edit(folder, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family, key", [("gpt2", "layer_norm_epsilon"),
                                         ("llama", "rms_norm_eps")])
@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_an_edited_config_value_changes_the_hash_and_a_moved_folder_does_not(
        tmp_path, lm_folders, family, key, kind):
    folder = tmp_path / "a" / family
    shutil.copytree(lm_folders[family], folder)
    before = load_backbone(str(folder), kind=kind)
    ids = torch.tensor([[101, 2023, 3857, 3478, 102]])
    with torch.no_grad():
        out_before = before.model(input_ids=ids)[0]
    # Another path, another library version's stamp: the same model, the same hash.
    moved = tmp_path / "b" / family
    shutil.copytree(folder, moved)
    _edit(moved, transformers_version="0.0.1")
    assert load_backbone(str(moved), kind=kind).hash == before.hash
    # A value the forward reads: other outputs, another hash.
    _edit(folder, **{key: 1.0})
    load_backbone.cache_clear()
    after = load_backbone(str(folder), kind=kind)
    with torch.no_grad():
        assert not torch.allclose(after.model(input_ids=ids)[0], out_before)
    assert after.hash != before.hash
