"""ATTACK29H (note 2): a given noise multiplier outside the range the accountant is run on
(PRV: below 0.1) passed `fedtune run`'s preflight and failed only at the first discovery,
after start-up, with a ConfigError whose advice named rounds and steps. The preflight now
refuses it in one line naming the key and the range; calibrated noise (0) is left to
discovery, which knows the sample rates."""

import pytest

from fedtune.config import ConfigError, load_config
from fedtune.config.accountant_steps import check_planned_steps

BASE = ["train.rounds=2", "train.local_steps=5"]


@pytest.mark.parametrize("sets, key", [
    (["privacy.sample.noise_multiplier=0.05"], "privacy.sample.noise_multiplier=0.05"),
    (["privacy.sample.noise_multiplier=2000"], "privacy.sample.noise_multiplier=2000"),
    (["privacy.sample.noise_multiplier=1.0", "split.enabled=true", "split.cut_layer=1",
      "split.smashed_dp.enabled=true", "split.smashed_dp.noise_multiplier=0.01"],
     "split.smashed_dp.noise_multiplier=0.01"),
])
def test_a_given_noise_outside_the_accountants_range_is_refused_before_start(sets, key):
    cfg = load_config(None, [*BASE, "privacy.sample.accountant=prv", *sets])
    with pytest.raises(ConfigError) as refused:
        check_planned_steps(cfg)
    text = str(refused.value)
    assert "\n" not in text and key in text and "[0.1, 1000]" in text, text


def test_rdp_takes_the_low_noise_prv_cannot_and_calibrated_noise_is_left_to_discovery():
    check_planned_steps(load_config(None, [*BASE, "privacy.sample.accountant=rdp",
                                           "privacy.sample.noise_multiplier=0.05"]))
    check_planned_steps(load_config(None, [*BASE, "privacy.sample.accountant=prv",
                                           "privacy.sample.noise_multiplier=0"]))
    check_planned_steps(load_config(None, [*BASE, "privacy.sample.enabled=false",
                                           "privacy.sample.noise_multiplier=0.05"]))
