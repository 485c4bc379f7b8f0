"""Parameter-efficient tuning methods, one module each, looked up by name."""

from fedtune.tuning import bitfit as _bitfit  # noqa: F401  (each module registers itself)
from fedtune.tuning import causal_lm as _causal_lm  # noqa: F401
from fedtune.tuning import head as _head  # noqa: F401
from fedtune.tuning import lora as _lora  # noqa: F401
from fedtune.tuning import prompt as _prompt  # noqa: F401
from fedtune.tuning import slash as _slash  # noqa: F401
from fedtune.tuning.base import TunedModel
from fedtune.tuning.registry import available_methods, build_tuned_model, register_method

__all__ = ["TunedModel", "available_methods", "build_tuned_model", "register_method"]
