"""The tokenizer's part of an export's prediction binding (`fedtune.run.export.tokenizer_hash`,
THREATS 7: an exported model's hash covers every value that changes a prediction). Besides the
fast tokenizer's serialized pipeline, transformers applies `tokenizer_config.json` switches in
Python around it: `split_special_tokens` changes the ids a text is encoded to,
`clean_up_tokenization_spaces` the text generated ids decode to. The hash covers what the
tokenizer does (`fedtune.data.tokenizer_probe`), so an edit of either, or of the next such
switch, moves it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def _tokenizers(tmp_path: Path, edit: dict) -> tuple:
    """The packaged MiniLM tokenizer as a model folder, loaded before and after `edit` is
    written into its tokenizer_config.json (each prepared as a causal LM's task does)."""
    from transformers import AutoTokenizer

    from fedtune.models.backbone import resolve_backbone_path
    from fedtune.task.lm import prepare_tokenizer

    folder = tmp_path / "tok"
    source = resolve_backbone_path("minilm")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    # A model folder as fedtune loads one: without config.json, transformers 5.0 guesses the
    # tokenizer class from the folder's path text (a moved copy could load as another class).
    shutil.copy(Path(source) / "config.json", folder / "config.json")
    before = AutoTokenizer.from_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(edit)
    config_file.write_text(json.dumps(config))
    after = AutoTokenizer.from_pretrained(folder)
    for tok in (before, after):
        prepare_tokenizer(tok)
    return before, after


@pytest.mark.parametrize("text", ["the build failed [SEP] see you", "a [MASK] b"])
def test_a_tokenizer_that_encodes_a_text_otherwise_has_another_hash(tmp_path, text):
    """Invariant: two tokenizers that give one text different input ids have different
    tokenizer_hash (split_special_tokens set in tokenizer_config.json)."""
    from fedtune.run.export import tokenizer_hash

    before, after = _tokenizers(tmp_path, {"split_special_tokens": True})
    ids_before, ids_after = before(text)["input_ids"], after(text)["input_ids"]
    assert ids_before != ids_after  # the edit changes what the model reads
    assert tokenizer_hash(before) != tokenizer_hash(after), (
        f"{text!r} encodes to {ids_before} then {ids_after}, yet the tokenizer hash (bound in "
        "prediction_sha256) is unchanged: the export loads and predicts otherwise")


def test_a_tokenizer_that_decodes_ids_otherwise_has_another_hash(tmp_path):
    """Invariant: two tokenizers that decode one id sequence (a generated continuation) to
    different text have different tokenizer_hash (clean_up_tokenization_spaces flipped)."""
    from fedtune.run.export import tokenizer_hash

    probe, _ = _tokenizers(tmp_path / "probe", {})
    current = bool(getattr(probe, "clean_up_tokenization_spaces", False))
    before, after = _tokenizers(tmp_path, {"clean_up_tokenization_spaces": not current})
    ids = before("hello , world . it ' s done")["input_ids"]
    said = (before.decode(ids, skip_special_tokens=True),
            after.decode(ids, skip_special_tokens=True))
    assert said[0] != said[1]  # the edit changes what `fedtune predict` prints
    assert tokenizer_hash(before) != tokenizer_hash(after), (
        f"the same ids decode to {said[0]!r} then {said[1]!r}, yet the tokenizer hash is "
        "unchanged: a causal LM's export prints other generations under the same binding")


def test_the_token_cache_key_moves_with_what_the_tokenizer_does(tmp_path):
    """The token cache (`fedtune.data.tokenize.cache_key`) keys on the same behaviour: arrays
    cached before split_special_tokens was set are not served after (they hold other ids)."""
    import datasets

    from fedtune.data.tokenize import cache_key

    before, after = _tokenizers(tmp_path, {"split_special_tokens": True})
    texts = datasets.Dataset.from_dict({"text": ["the build failed [SEP] see you"]})
    assert cache_key(texts, before, 16) == cache_key(texts, before, 16)
    assert cache_key(texts, before, 16) != cache_key(texts, after, 16)


def test_the_tokenizer_hash_is_stable_and_ignores_where_the_tokenizer_lives(tmp_path):
    """One tokenizer hashes alike before and after it was called (the probes leave no state
    the hash reads) and from another folder (an export moves to another machine)."""
    from transformers import AutoTokenizer

    from fedtune.run.export import tokenizer_hash

    before, _ = _tokenizers(tmp_path, {})
    first = tokenizer_hash(before)
    before(["a", "b c"], padding="max_length", truncation=True, max_length=5)
    assert tokenizer_hash(before) == first
    shutil.copytree(tmp_path / "tok", tmp_path / "elsewhere")
    moved = AutoTokenizer.from_pretrained(tmp_path / "elsewhere")
    from fedtune.task.lm import prepare_tokenizer

    prepare_tokenizer(moved)
    assert tokenizer_hash(moved) == first
