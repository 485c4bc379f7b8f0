import tomllib
from pathlib import Path

import pytest

from fedtune.config import ConfigError, ExperimentConfig, config_from_toml, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_file_equals_builtin_defaults():
    # `fedtune run` with no file must run exactly experiments/quickstart.toml.
    assert load_config(ROOT / "experiments" / "quickstart.toml") == load_config(None)


def test_resolved_toml_round_trips():
    cfg = load_config(None, ["train.rounds=3", "tuning.prompt.length=7", "seed=4"])
    again = config_from_toml(cfg.to_toml())
    assert again == cfg
    assert (again.train.rounds, again.tuning.prompt.length, again.seed) == (3, 7, 4)


def test_override_values_are_typed():
    cfg = load_config(None, ["privacy.sample.enabled=false", "train.lr=0.5",
                             "data.partition=iid"])
    assert cfg.privacy.sample.enabled is False
    assert cfg.train.lr == 0.5
    assert cfg.data.partition == "iid"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("tuning.method=nope",
         "tuning.method='nope' is not one of: bitfit, head, lora, prompt, slash"),
        ("data.partition=random", "data.partition='random' is not one of:"),
        ("privacy.sample.accountant=gdp",
         "privacy.sample.accountant='gdp' is not one of: prv, rdp"),
        ("privacy.sample.grad_sample_mode=fast", "privacy.sample.grad_sample_mode='fast'"),
        ("train.rounds=0", "train.rounds must be > 0"),
        ("train.rounds=2.5", "train.rounds must be an integer"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("privacy.sample.delta=1.5", "privacy.sample.delta must be in (0, 1)"),
        ("privacy.sample.enabled=3", "privacy.sample.enabled must be true or false"),
        ("train.clients_per_round=50", "train.clients_per_round=50 exceeds data.num_clients=20"),
        ("train.epochs=3", "unknown key train.epochs in train; allowed:"),
        ("modle.backbone=x", "unknown key modle in the config"),
        ("data.corpus=enron", "data.corpus='enron' is not one of:"),
        ("model.max_length=0", "model.max_length must be > 0"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["train.rounds"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["seed=1", "seed.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 3")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)


def test_every_experiment_file_is_valid():
    from fedtune.study.sweep import load_sweep

    for path in sorted((ROOT / "experiments").glob("*.toml")):
        if "base" in tomllib.loads(path.read_text()):
            assert load_sweep(path).variants  # a sweep: each variant's config validates
        else:
            load_config(path)


def test_defaults_are_the_quickstart():
    cfg = ExperimentConfig()
    assert (cfg.data.num_clients, cfg.train.clients_per_round, cfg.train.rounds) == (20, 5, 8)
    assert cfg.privacy.sample.enabled and cfg.privacy.sample.target_epsilon == 8.0


def test_flwr_run_config_path_reads_file_and_overrides():
    from fedtune.config.flower_run import config_from_run_config

    cfg = config_from_run_config({
        "config": str(ROOT / "experiments" / "quickstart.toml"),
        "overrides": "train.rounds=2 'name=from flwr'",
    })
    assert cfg.train.rounds == 2 and cfg.name == "from flwr"


def test_lr_decay_range():
    with pytest.raises(ConfigError, match=r"train.lr_decay must be in \(0, 1\]"):
        load_config(None, ["train.lr_decay=1.5"])


def test_a_gpu_client_without_cuda_gets_a_clear_error(monkeypatch):
    import torch

    from fedtune.runtime.torch_setup import client_device, model_device

    assert client_device(0.0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="num_gpus_per_client=0.5 but this process sees no"):
        client_device(0.5)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    assert model_device(frozen) == torch.device("cpu")


@pytest.mark.parametrize("key", ["privacy.sample.max_grad_norm", "train.local_epochs",
                                 "privacy.sample.target_epsilon", "train.lr",
                                 "privacy.user.clip_norm", "split.smashed_dp.target_epsilon"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "+inf"])
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    # inf passes every "> 0" check and gave silently wrong runs (infinite clipping bound,
    # endless local training, an unreachable budget).
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"])
    message = str(info.value)
    assert message.startswith(f"{key} must be a finite number, got ") and "\n" not in message


def test_non_finite_numbers_in_files_and_free_form_tables_are_refused(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[privacy.sample]\nmax_grad_norm = inf\n")
    with pytest.raises(ConfigError, match=r"privacy.sample.max_grad_norm must be a finite"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"data.options.test_fraction must be a finite"):
        load_config(None, ["data.options={test_fraction = nan}"])
    with pytest.raises(ConfigError, match=r"plugins\[0\].ratio must be a finite"):
        load_config(None, ['plugins=[{name = "pruning", ratio = inf}]'])


@pytest.mark.parametrize("seed", [2**32, 2**63 - 1])
def test_seed_outside_numpys_range_is_refused_at_load(seed):
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 4294967295\], got "):
        load_config(None, [f"seed={seed}"])
    assert load_config(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_an_unknown_key_with_a_newline_stays_on_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ['train={"a\\nb" = 1}'])  # TOML "a\nb": a key with a newline
    assert "\n" not in str(info.value) and "'train.a\\nb'" in str(info.value)


def test_flwr_run_config_overrides_with_an_open_quote_are_a_config_error():
    from fedtune.config.flower_run import config_from_run_config

    with pytest.raises(ConfigError) as info:
        config_from_run_config({"config": str(ROOT / "experiments" / "quickstart.toml"),
                                "overrides": "train.rounds=2 'name=oops"})
    assert "run config overrides=" in str(info.value) and "quotation" in str(info.value)


def test_runtime_settings_defaults_config_and_environment(monkeypatch, tmp_path):
    from fedtune.config.runtime import runtime_settings

    for env in ("FEDTUNE_GRID_POLL_S", "FEDTUNE_SUPERNODE_POLL_S", "FEDTUNE_CACHE_DIR"):
        monkeypatch.delenv(env, raising=False)
    defaults = runtime_settings()
    assert (defaults.grid_poll_s, defaults.supernode_poll_s) == (0.1, 0.1)
    assert defaults.cache_dir == Path.home() / ".cache" / "fedtune"
    cfg = load_config(None, ["runtime.grid_poll_s=2", f"runtime.cache_dir={tmp_path}"])
    assert runtime_settings(cfg).grid_poll_s == 2.0
    assert runtime_settings(cfg).cache_dir == tmp_path
    # The environment overrides the config.
    monkeypatch.setenv("FEDTUNE_GRID_POLL_S", "0.5")
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "env"))
    assert runtime_settings(cfg).grid_poll_s == 0.5
    assert runtime_settings(cfg).cache_dir == tmp_path / "env"
    # A bad variable fails the setting it names, and only that one.
    monkeypatch.setenv("FEDTUNE_SUPERNODE_POLL_S", "4")
    settings = runtime_settings(cfg)
    assert settings.grid_poll_s == 0.5
    with pytest.raises(ValueError, match=r"FEDTUNE_SUPERNODE_POLL_S='4': expected seconds "
                                         r"in \(0, 3\]"):
        _ = settings.supernode_poll_s


@pytest.mark.parametrize(("override", "needle"), [
    ("runtime.grid_poll_s=0", "runtime.grid_poll_s must be in (0, 60] seconds, got 0.0"),
    ("runtime.supernode_poll_s=5", "runtime.supernode_poll_s must be in (0, 3] seconds"),
])
def test_runtime_values_are_validated(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value)


# --- upper bounds and the name (THREATS.md 8; issue 27 #7) ------------------------------------

@pytest.mark.parametrize(("override", "needle"), [
    ("train.rounds=9223372036854775808", "train.rounds must be in [1, 100000]"),
    ("train.local_steps=9223372036854775807", "train.local_steps must be in [1, 1e+06]"),
    ("train.batch_size=9223372036854775807", "train.batch_size must be in [1, 65536]"),
    ("data.num_clients=9223372036854775807", "data.num_clients must be in [1, 1e+06]"),
    ("model.max_length=9223372036854775807", "model.max_length must be in [1, 65536]"),
    ("train.lr=1e308", "train.lr must be in [1e-12, 10000]"),
    ("privacy.sample.delta=1e-320", "privacy.sample.delta must be in [1e-30, 0.5]"),
    ("privacy.user.delta=1e-320", "privacy.user.delta must be in [1e-30, 0.5]"),
    ("name='../../escape'", "name='../../escape' must be a single folder name"),
    ("name='..'", "name='..' must be a single folder name"),
    ("name='a\\tb'", "must be a single folder name"),
])
def test_values_past_what_fits_the_machine_are_refused_in_one_line(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert needle in message and "\n" not in message and len(message) < 300


def test_values_at_the_bounds_load():
    cfg = load_config(None, ["train.rounds=100000", "privacy.sample.delta=1e-30",
                             "train.batch_size=65536", "name=my-run_1.b"])
    assert cfg.train.rounds == 100_000 and cfg.name == "my-run_1.b"


# Every number has an upper bound, the per-method tables' too (fedtune.config.methods BOUNDS);
# moved here from the attack's tests/test_attack_config.py (assertions kept).
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


@pytest.mark.parametrize(("override", "needle"), [
    ("tuning.head_hidden=16385", "tuning.head_hidden must be in [0, 16384], got 16385"),
    ("tuning.lora.r=1025", "tuning.lora.r must be in [1, 1024], got 1025"),
    ("tuning.lora.from_layer=10001", "tuning.lora.from_layer must be in [0, 10000]"),
    ("tuning.bitfit.from_layer=10001", "tuning.bitfit.from_layer must be in [0, 10000]"),
    ("tuning.prompt.layer=10001", "tuning.prompt.layer must be in [0, 10000]"),
    ("tuning.prompt.length=4097", "tuning.prompt.length must be in [1, 4096]"),
    ("tuning.slash.seed=4294967296", "tuning.slash.seed must be in [0, 4294967295]"),
    ("tuning.slash.size=16385", "tuning.slash.size must be in [1, 16384]"),
    ("tuning.slash.lr_scale=101", "tuning.slash.lr_scale must be in [1e-09, 100]"),
    ("data.alpha=1e7", "data.alpha must be in [1e-06, 1e+06]"),
    ("runtime.prefix_cache_gb=1025", "runtime.prefix_cache_gb must be in [1e-06, 1024]"),
])
def test_method_and_section_bounds_name_key_and_range_in_one_line(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_method_values_at_their_bounds_load():
    cfg = load_config(None, ["tuning.head_hidden=16384", "tuning.lora.r=1024",
                             "tuning.lora.alpha=65536", "tuning.prompt.length=4096",
                             "tuning.slash.size=16384", "tuning.slash.seed=4294967295",
                             "tuning.bitfit.lr_scale=100", "data.alpha=1e6",
                             "runtime.prefix_cache_gb=1024"])
    assert cfg.tuning.settings("lora").r == 1024 and cfg.tuning.head_hidden == 16_384
    assert cfg.tuning.settings("slash").seed == 2**32 - 1
