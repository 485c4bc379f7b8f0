"""Attack (THREATS.md class 8): every number in a config has an upper bound that fits the
machine, refused in one line naming the key."""

import pytest

from fedtune.config import ConfigError, load_config

HUGE = {
    "tuning.head_hidden": ([], 10**15),  # a head of 10^15 hidden units
    "tuning.lora.r": (["tuning.method=lora"], 10**15),
    "tuning.lora.alpha": (["tuning.method=lora"], 10**15),
    "tuning.lora.lr_scale": (["tuning.method=lora"], 1e300),  # lr 1e300 past train.lr's bound
    "tuning.prompt.length": (["tuning.method=prompt"], 10**15),
    "tuning.prompt.lr_scale": (["tuning.method=prompt"], 1e300),
    "tuning.slash.size": (["tuning.method=slash"], 10**15),
    "tuning.bitfit.lr_scale": (["tuning.method=bitfit"], 1e300),
    "data.alpha": ([], 1e300),
    "runtime.prefix_cache_gb": ([], 1e300),
}


@pytest.mark.parametrize("key", HUGE)
def test_a_huge_number_is_refused_naming_its_key(key):
    """A number far past what fits one machine is refused by load_config, naming the key."""
    sets, value = HUGE[key]
    with pytest.raises(ConfigError, match=key.rsplit(".", 1)[-1]):
        load_config(None, [*sets, f"{key}={value}"])
