"""The two kinds of bad input an entry point reports as one line (no traceback): a config
value, and a deployment argument. Every layer may raise them, so they live at the bottom."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what is allowed."""


class DeployError(ValueError):
    """A deployment argument that cannot work (bad address, missing file)."""
