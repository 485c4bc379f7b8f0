"""Every DP draw comes from `fedtune.privacy.randomness`, found by reading the source.

The scan walks the syntax tree of every module under fedtune/, clients/ and strategies/ and
flags each call that could draw randomness from somewhere else: seeding (`manual_seed`,
numpy seeds and generators), torch's random functions and in-place samplers, Python's
`random`, `secrets` outside the source module, and any `generator=` / `noise_generator=`
argument that is not None. A flagged call is allowed only where ALLOWED names it with the
reason it is not DP randomness; in the DP modules nothing is allowed. Each DP module must
get its draws from the source (`dp_source` / `DPRandom`).
"""

from __future__ import annotations

import ast
from pathlib import Path

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
    ("clients/train.py", "torch.Generator"): "plain training's shuffle; DP replaces the loader",
    ("clients/train.py", "manual_seed"): "plain training's shuffle; DP replaces the loader",
    ("clients/train.py", "generator="): "plain training's shuffle; DP replaces the loader",
    ("clients/faults.py", "random.Random"): "simulated fault injection, not a release",
    ("strategies/delta_fedavg.py", "random.Random"):
        "client selection without user-level DP (sample-level DP does not rely on it)",
    ("fedtune/validation_split.py", "np.random.default_rng"): "validation/train partitioning",
    ("fedtune/checkpoint.py", "np.random.get_state"): "resume of non-DP global RNG state",
    ("fedtune/checkpoint.py", "np.random.set_state"): "resume of non-DP global RNG state",
    ("fedtune/checkpoint.py", "random.getstate"): "resume of non-DP global RNG state",
    ("fedtune/checkpoint.py", "random.setstate"): "resume of non-DP global RNG state",
    ("fedtune/checkpoint.py", "torch.random.get_rng_state"): "resume of non-DP global state",
    ("fedtune/checkpoint.py", "torch.random.set_rng_state"): "resume of non-DP global state",
}
TORCH_RANDOM = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial",
                "poisson", "rand_like", "randn_like", "randint_like", "seed",
                "get_rng_state", "set_rng_state"}
IN_PLACE = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_",
            "log_normal_", "cauchy_"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _flag(call: ast.Call) -> list[str]:
    """The reasons `call` may draw from a source other than fedtune.privacy.randomness."""
    name = _dotted(call.func)
    last = name.rsplit(".", 1)[-1]
    flags = []
    if last == "manual_seed":
        flags.append("manual_seed")
    elif name == "torch.Generator" or name.endswith("torch.Generator"):
        flags.append("torch.Generator")
    elif name.startswith(("np.random.", "numpy.random.")):
        flags.append(name.replace("numpy.", "np.", 1))
    elif name.startswith("random."):
        flags.append(name)
    elif name.startswith(("torch.", "torch.random.", "torch.cuda.")) and last in TORCH_RANDOM:
        flags.append(name)
    elif isinstance(call.func, ast.Attribute) and last in IN_PLACE:
        flags.append(f".{last}")
    elif name.startswith("secrets."):
        flags.append(name)
    for kw in call.keywords:
        if kw.arg in ("generator", "noise_generator") and not (
                isinstance(kw.value, ast.Constant) and kw.value.value is None):
            flags.append(f"{kw.arg}=")
    return flags


def _imports(tree: ast.AST) -> list[str]:
    """Modules of randomness imported by name: `random`, `numpy.random`, `secrets`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in ("random", "secrets",
                                                               "numpy.random")]
        elif isinstance(node, ast.ImportFrom) and node.module in ("random", "secrets",
                                                                   "numpy.random"):
            found.append(f"from {node.module}")
    return found


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            yield rel, ast.parse(path.read_text(), filename=rel)


def _scan():
    found: dict[tuple[str, str], list[int]] = {}
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for flag in _flag(node):
                    if rel == SOURCE_MODULE and flag == "secrets.token_bytes":
                        continue  # the source's own entropy
                    found.setdefault((rel, flag), []).append(node.lineno)
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
