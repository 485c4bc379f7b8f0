"""Parameter-efficient tuning methods, one module each, looked up by name."""

from fedtune.tuning import prompt as _prompt  # noqa: F401  (registers "prompt")
from fedtune.tuning.base import TunedModel
from fedtune.tuning.registry import available_methods, build_tuned_model, register_method

__all__ = ["TunedModel", "available_methods", "build_tuned_model", "register_method"]
