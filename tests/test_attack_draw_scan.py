"""Attack (THREATS.md class 1): the structural scan flags every way code can draw randomness."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "draw_sites", Path(__file__).with_name("test_dp_draw_sites.py"))
draw_sites = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(draw_sites)

# Each of these draws randomness from a source other than fedtune.privacy.randomness (torch's
# or numpy's global generator, or the OS). Put into fedtune/split/smashed_dp.py or
# fedtune/privacy/dpsgd.py in a scratch copy, the first two passed tests/test_dp_draw_sites.py.
FOREIGN_DRAWS = {
    "distributions": "torch.distributions.Normal(0.0, s).sample(shape)",
    "bare-import": "from torch import randn_like\nrandn_like(x)",
    "aliased-torch": "import torch as th\nth.randn(3)",
    "aliased-numpy-random": "import numpy as onp\nonp.random.normal(size=3)",
    "shuffling-loader": "DataLoader(data, batch_size=8, shuffle=True)",
    "random-sampler": "RandomSampler(data)",
    "os-entropy": "os.urandom(32)",
}


@pytest.mark.parametrize("code", FOREIGN_DRAWS.values(), ids=FOREIGN_DRAWS.keys())
def test_the_draw_site_scan_flags_each_foreign_draw(code):
    """The draw-site scan flags every call that can draw randomness outside the DP source."""
    tree = ast.parse(code)
    flags = [f for node in ast.walk(tree) if isinstance(node, ast.Call)
             for f in draw_sites._flag(node)]
    assert flags or draw_sites._imports(tree), f"not flagged: {code!r}"
