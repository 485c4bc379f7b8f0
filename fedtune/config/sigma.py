"""The noise multipliers each accountant is run on: a plain table the config's own checks
and the accountants share (no import of either)."""

from __future__ import annotations

# Physical ranges of an accounted noise multiplier. Below sigma 0.1 a release is worth
# hundreds of epsilon (RDP: 586 for 10 steps at q 0.5) and PRV breaks down (inf at 0.05; at
# 7e-7 it asks for 32e15 floats, below 1e-9 "Maximum allowed size exceeded"); RDP stays
# finite and fast far lower, and is what tests of a noise-free mechanism use (sigma ~1e-6),
# but divides by zero near 1e-200. Above 1e3 a release is no release worth counting;
# calibrated noise for any target epsilon up to 100 sits near 0.3-2.
SIGMA_FLOOR = {"rdp": 1e-9}
DEFAULT_SIGMA_FLOOR = 0.1
SIGMA_MAX = 1e3


def sigma_range(accountant: str) -> tuple[float, float]:
    """The noise multipliers `accountant` is run on (`SIGMA_FLOOR`, `SIGMA_MAX`)."""
    return SIGMA_FLOOR.get(accountant, DEFAULT_SIGMA_FLOOR), SIGMA_MAX
