"""Every DP draw comes from `fedtune.privacy.randomness`, found by reading the source.

The scan walks the syntax tree of every module under fedtune/, clients/ and strategies/ and
flags each call that could draw randomness from somewhere else, with import aliases resolved
(`import torch as th`, `from torch import randn_like`, `import numpy as onp`): seeding
(`manual_seed`, numpy seeds and generators), torch's random functions (every `rand*`,
`normal`, `bernoulli`, `poisson`, `multinomial`, ...) and in-place fills, any
`torch.distributions` object (its `sample`/`rsample`), `numpy.random`, Python's `random`,
`secrets` and `os.urandom` outside the source module, random samplers, `shuffle=` and a
dataset's `.shuffle`, and any `generator=` / `noise_generator=` argument that is not None.
A flagged call is allowed only where ALLOWED names it with the
reason it is not DP randomness; in the DP modules nothing is allowed. Each DP module must
get its draws from the source (`dp_source` / `DPRandom`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedtune", "clients", "strategies")
SOURCE_MODULE = "fedtune/privacy/randomness.py"
# Modules that make DP draws: no allow-list entry may name them.
DP_MODULES = {
    "fedtune/privacy/dpsgd.py": "Poisson batches and DP-SGD noise",
    "fedtune/split/smashed_dp.py": "smashed-data noise and slots",
    "clients/split.py": "the smashed-DP source of a split client's round",
    "strategies/user_dp.py": "user-level cohorts and noise",
    SOURCE_MODULE: "the source itself",
}
# (module, flagged call) -> why it is not DP randomness.
ALLOWED = {
    ("fedtune/tuning/prompt.py", "torch.Generator"): "prompt initialisation (public model)",
    ("fedtune/tuning/prompt.py", "manual_seed"): "prompt initialisation (public model)",
    ("fedtune/tuning/prompt.py", "torch.randint"): "prompt initialisation (public model)",
    ("fedtune/tuning/prompt.py", "generator="): "prompt initialisation (public model)",
    ("fedtune/tuning/slash.py", "torch.Generator"): "SLaSH initialisation (public model)",
    ("fedtune/tuning/slash.py", "manual_seed"): "SLaSH initialisation (public model)",
    ("fedtune/tuning/slash.py", "torch.randn"): "SLaSH initialisation (public model)",
    ("fedtune/tuning/slash.py", "generator="): "SLaSH initialisation (public model)",
    ("fedtune/tuning/lora.py", "manual_seed"): "LoRA initialisation under fork_rng",
    # The causal-LM methods' initialisation: seeded, public, never DP randomness.
    ("fedtune/tuning/causal_lm.py", "torch.Generator"): "LM prompt initialisation",
    ("fedtune/tuning/causal_lm.py", "manual_seed"): "LM prompt/LoRA initialisation",
    ("fedtune/tuning/causal_lm.py", "torch.randint"): "LM prompt initialisation",
    ("fedtune/tuning/causal_lm.py", "generator="): "LM prompt initialisation",
    ("clients/train.py", "torch.Generator"): "plain training's shuffle; DP replaces the loader",
    ("clients/train.py", "manual_seed"): "plain training's shuffle; DP replaces the loader",
    ("clients/train.py", "generator="): "plain training's shuffle; DP replaces the loader",
    ("clients/train.py", "shuffle="): "plain training's shuffle; DP replaces the loader",
    ("fedtune/data/partition.py", ".shuffle"): "IID partition order from the config's seed",
    ("clients/faults.py", "random.Random"): "simulated fault injection, not a release",
    ("strategies/delta_fedavg.py", "random.Random"):
        "client selection without user-level DP (sample-level DP does not rely on it)",
    ("fedtune/data/validation_split.py", "np.random.default_rng"): "validation/train partitioning",
    ("fedtune/run/checkpoint.py", "np.random.get_state"): "resume of non-DP global RNG state",
    ("fedtune/run/checkpoint.py", "np.random.set_state"): "resume of non-DP global RNG state",
    ("fedtune/run/checkpoint.py", "random.getstate"): "resume of non-DP global RNG state",
    ("fedtune/run/checkpoint.py", "random.setstate"): "resume of non-DP global RNG state",
    ("fedtune/run/checkpoint.py", "torch.random.get_rng_state"): "resume of non-DP global state",
    ("fedtune/run/checkpoint.py", "torch.random.set_rng_state"): "resume of non-DP global state",
    ("fedtune/run/atomic.py", "secrets.token_hex"):
        "unguessable temp file names (no planted link can wait for one), not a DP draw",
}
# torch's random functions (also under torch.random / torch.cuda): every rand*, and these.
TORCH_RANDOM = {"normal", "bernoulli", "multinomial", "poisson", "seed", "get_rng_state",
                "set_rng_state"}
# In-place random fills, as tensor methods or torch.nn.init functions.
IN_PLACE = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_",
            "log_normal_", "cauchy_", "trunc_normal_", "kaiming_normal_", "kaiming_uniform_",
            "xavier_normal_", "xavier_uniform_", "orthogonal_", "sparse_"}
# Samplers that draw an order or a subset (a generator= is flagged on its own).
SAMPLERS = {"RandomSampler", "SubsetRandomSampler", "WeightedRandomSampler",
            "DistributedSampler"}
# What a bare snippet (no imports) means by these names.
DEFAULT_ALIASES = {"np": "numpy"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from every import in `tree`
    (`import numpy as onp`, `from torch import randn_like`, `from numpy import random`)."""
    aliases = dict(DEFAULT_ALIASES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:  # `import numpy.random` binds `numpy`
                    top = a.name.split(".", 1)[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _resolve(name: str, aliases: dict[str, str]) -> str:
    """`name` with its first part replaced by what it was imported as; numpy spelt `np`."""
    head, _, rest = name.partition(".")
    full = aliases.get(head, head) + (f".{rest}" if rest else "")
    return "np" + full[len("numpy"):] if full.startswith("numpy.") else full


def _truthy(value: ast.AST) -> bool:
    return not (isinstance(value, ast.Constant) and value.value in (None, False))


def _flag(call: ast.Call, aliases: dict[str, str] | None = None) -> list[str]:
    """The reasons `call` may draw from a source other than fedtune.privacy.randomness;
    `aliases` (from `_aliases`) resolves the module's imported names."""
    name = _resolve(_dotted(call.func), DEFAULT_ALIASES if aliases is None else aliases)
    last = name.rsplit(".", 1)[-1]
    flags = []
    if last == "manual_seed":
        flags.append("manual_seed")
    elif name == "torch.Generator" or name.endswith("torch.Generator"):
        flags.append("torch.Generator")
    elif name.startswith("torch.distributions."):  # constructing one, or .sample/.rsample
        flags.append("torch.distributions")
    elif name.startswith("np.random."):
        flags.append(name)
    elif name.startswith(("random.", "secrets.")) or name == "os.urandom":
        flags.append(name)
    elif name.startswith(("torch.", "torch.random.", "torch.cuda.")) and (
            last.startswith("rand") or last in TORCH_RANDOM):
        flags.append(name)
    elif isinstance(call.func, ast.Attribute) and last in IN_PLACE:
        flags.append(f".{last}")
    elif last in SAMPLERS:
        flags.append(last)
    elif isinstance(call.func, ast.Attribute) and last == "shuffle":  # a dataset's own
        flags.append(".shuffle")
    for kw in call.keywords:
        if kw.arg in ("generator", "noise_generator") and _truthy(kw.value):
            flags.append(f"{kw.arg}=")
        elif kw.arg == "shuffle" and _truthy(kw.value):
            flags.append("shuffle=")
    return flags


def _tree_flags(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, flag) for every flagged call in `tree`, import aliases resolved."""
    aliases = _aliases(tree)
    return [(node.lineno, flag) for node in ast.walk(tree) if isinstance(node, ast.Call)
            for flag in _flag(node, aliases)]


RANDOM_MODULES = ("random", "secrets", "numpy.random", "torch.distributions")


def _imports(tree: ast.AST) -> list[str]:
    """Modules of randomness imported by name: `random`, `numpy.random`, `secrets`,
    `torch.distributions` (also `from numpy import random`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in RANDOM_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module in RANDOM_MODULES:
            found.append(f"from {node.module}")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [f"from {node.module} import {a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in RANDOM_MODULES]
    return found


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            yield rel, ast.parse(path.read_text(), filename=rel)


def _scan():
    found: dict[tuple[str, str], list[int]] = {}
    for rel, tree in _modules():
        for line, flag in _tree_flags(tree):
            if rel == SOURCE_MODULE and flag == "secrets.token_bytes":
                continue  # the source's own entropy
            found.setdefault((rel, flag), []).append(line)
    return found


def test_no_dp_draw_uses_another_source():
    found = _scan()
    offending = {f"{rel}:{lines} {flag}" for (rel, flag), lines in found.items()
                 if (rel, flag) not in ALLOWED}
    assert not offending, ("randomness from outside fedtune.privacy.randomness (a DP draw "
                           f"must use dp_source; a non-DP one needs an ALLOWED reason): "
                           f"{sorted(offending)}")
    # Every allowance is still needed (no stale reasons), and none covers a DP module.
    assert set(ALLOWED) <= set(found), sorted(set(ALLOWED) - set(found))
    assert not {rel for rel, _ in ALLOWED} & set(DP_MODULES)


def test_dp_modules_import_no_other_randomness_and_draw_from_the_source():
    trees = dict(_modules())
    for rel in DP_MODULES:
        tree = trees[rel]
        imported = _imports(tree)
        allowed = ["secrets"] if rel == SOURCE_MODULE else []
        assert imported == allowed, (rel, imported)
        if rel == SOURCE_MODULE:
            continue
        names = {_dotted(n.func).rsplit(".", 1)[-1] for n in ast.walk(tree)
                 if isinstance(n, ast.Call)}
        sources = {"dp_source", "normal", "permutation"} if rel.endswith("smashed_dp.py") \
            else {"dp_source"}
        assert sources & names, (rel, DP_MODULES[rel])


def test_the_scan_catches_each_kind_of_foreign_draw():
    """A test that the scan itself would have caught the old code's sources."""
    snippets = {
        "g = torch.Generator(device=d).manual_seed(secrets.randbits(64))":
            {"torch.Generator", "manual_seed", "secrets.randbits"},
        "np.random.Generator(np.random.PCG64(s))": {"np.random.Generator", "np.random.PCG64"},
        "np.random.default_rng(7).normal()": {"np.random.default_rng"},
        "torch.normal(0.0, 1.0, (3,), generator=g)": {"torch.normal", "generator="},
        "engine.make_private(noise_generator=gen)": {"noise_generator="},
        "x.normal_()": {".normal_"},
        "random.random()": {"random.random"},
        "torch.randperm(8)": {"torch.randperm"},
        "DataLoader(d, generator=None)": set(),
    }
    for code, expected in snippets.items():
        flags = {f for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)
                 for f in _flag(node)}
        assert flags == expected, (code, flags)


# Each draws from a source other than fedtune.privacy.randomness (torch's or numpy's global
# generator, or the OS); the first two passed the old scan inside a DP module (the attack's
# reproducers, moved from tests/test_attack_draw_scan.py), with the flag each one must get.
FOREIGN_DRAWS = {
    "distributions": ("torch.distributions.Normal(0.0, s).sample(shape)",
                      {"torch.distributions"}),
    "distributions-imported": ("from torch.distributions import Laplace\nLaplace(0, 1).rsample()",
                               {"torch.distributions"}),
    "bare-import": ("from torch import randn_like\nrandn_like(x)", {"torch.randn_like"}),
    "aliased-torch": ("import torch as th\nth.randn(3)", {"torch.randn"}),
    "aliased-numpy-random": ("import numpy as onp\nonp.random.normal(size=3)",
                             {"np.random.normal"}),
    "numpy-random-module": ("from numpy import random as npr\nnpr.default_rng()",
                            {"np.random.default_rng"}),
    "aliased-python-random": ("import random as r\nr.gauss(0, 1)", {"random.gauss"}),
    "shuffling-loader": ("DataLoader(data, batch_size=8, shuffle=True)", {"shuffle="}),
    "random-sampler": ("RandomSampler(data)", {"RandomSampler"}),
    "os-entropy": ("os.urandom(32)", {"os.urandom"}),
    "os-entropy-imported": ("from os import urandom\nurandom(32)", {"os.urandom"}),
    "init-fill": ("from torch.nn import init\ninit.kaiming_uniform_(w)", {".kaiming_uniform_"}),
}


@pytest.mark.parametrize("code,expected", FOREIGN_DRAWS.values(), ids=FOREIGN_DRAWS.keys())
def test_the_draw_site_scan_flags_each_foreign_draw(code, expected):
    """The draw-site scan flags every call that can draw randomness outside the DP source,
    import aliases resolved (a module is scanned as a whole, like `_scan` does)."""
    flags = {flag for _, flag in _tree_flags(ast.parse(code))}
    assert flags == expected, (code, flags)


def test_a_shuffle_turned_off_is_not_a_draw():
    for code in ("DataLoader(d, shuffle=False)", "DataLoader(d, shuffle=None)",
                 "import torch as th\nth.zeros(3)", "from torch import nn\nnn.Linear(2, 2)"):
        assert _tree_flags(ast.parse(code)) == [], code
