"""The one-line refusal a config gets: shared by the tests that list refused settings."""

from __future__ import annotations

import pytest

from fedtune.config import ConfigError, load_config


def refusal(sets: list[str]) -> str:
    """The ConfigError text `load_config` raises for `sets`, checked to be one line."""
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    text = str(err.value)
    assert "\n" not in text, text
    return text
