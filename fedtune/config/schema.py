"""The experiment config's sections: one dataclass per TOML table, each with its defaults
and its own `validate()`; `ExperimentConfig.validate()` adds the rules across sections.
Reading TOML into them is fedtune.config.load; the shared range rules are
fedtune.config.checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from fedtune.config.checks import (
    SEED_MAX,
    check_bounds,
    check_name,
    check_table_bounds,
    require_choice,
    require_finite,
    require_nonempty,
    require_nonnegative,
    require_positive,
)
from fedtune.config.errors import ConfigError
from fedtune.config.pruning import check_setting as check_pruning
from fedtune.config.registry import available, config_checks, method_names, method_spec
from fedtune.config.runtime import RuntimeConfig
from fedtune.config.sigma import sigma_range
from fedtune.config.task import TaskConfig, check_task
from fedtune.config.user_unit import check_user_unit

ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
OPTIMIZERS = ("sgd", "adam")
# train.prefix_cache: "auto" = on when the method leaves a frozen prefix (and split mode is
# off), "on" = the same but a config that cannot use it is an error, "off" = never.
PREFIX_CACHE = ("auto", "on", "off")
# data.labels: a classifier head's outputs, and names that reach every export and report.
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 200
# data.target_domain as a list: the values of one column that make the target domain (a
# corpus' groups, such as its mailing lists), far fewer than any corpus' rows.
MAX_TARGET_VALUES = 10_000


@dataclass
class ModelConfig:
    # "minilm" is the bundled all-MiniLM-L6-v2; anything else is an HF name or a local path.
    backbone: str = "minilm"
    max_length: int = 64
    # Transformer blocks dropped at load (fedtune.models.layer_pruning; grammar in
    # fedtune.config.pruning): a list of indices
    # (`[4, 5]`; `[]` keeps all) or a rule "<rule>:<k>" ("every:3", "top:2",
    # "importance:2"). A run resolves a rule into the list at its start and records that.
    prune_layers: list[int] | str = field(default_factory=list)

    def validate(self) -> None:
        require_positive("model.max_length", self.max_length)
        require_nonempty("model.backbone", self.backbone)
        if self.prune_layers:
            check_pruning(self.prune_layers)


@dataclass
class DataConfig:
    corpus: str = "spamassassin"
    partition: str = "dirichlet"
    num_clients: int = 20
    alpha: float = 0.5
    by: str = "mailing_list"
    options: dict[str, Any] = field(default_factory=dict)
    # Two domains (population expansion): rows whose `domain_by` column equals
    # `target_domain` (one value, or any of a list: e.g. the small mailing lists) are split
    # among the first `target_clients` clients, the other rows (the source domain) among the
    # remaining num_clients - target_clients, and the test split keeps only target rows.
    # Empty `domain_by`: one domain, every row, every client.
    domain_by: str = ""
    target_domain: str | list[str] = ""
    target_clients: int = 0
    # Share of the training split the server holds out as its validation split (seeded,
    # stratified by label, never from test; with two domains, from target rows): every
    # selection (best round, sweep tuning) reads it, and the test split is read only for the
    # final model. 0 disables it: then no round is evaluated and nothing selects.
    validation_fraction: float = 0.1
    # The classes, in order (class id = position): every row's label must be one of them
    # (or an integer id into them). Empty: the training split's labels, sorted; a label
    # only in the test split, or two that differ only in case or spaces, is refused.
    labels: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require_choice("data.corpus", self.corpus, available("corpus"))
        self._check_labels()
        require_choice("data.partition", self.partition, available("partitioner"))
        require_positive("data.num_clients", self.num_clients)
        require_positive("data.alpha", self.alpha)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError("data.validation_fraction must be in [0, 1) (0 = no validation "
                              f"split), got {self.validation_fraction!r}")
        if not self.domain_by:
            if self.target_domain or self.target_clients:
                raise ConfigError("data.target_domain and data.target_clients need "
                                  "data.domain_by (the column that names each row's domain)")
            return
        self._check_target_domain()
        if not 1 <= self.target_clients <= self.num_clients:
            raise ConfigError(f"data.target_clients must be in [1, data.num_clients="
                              f"{self.num_clients}], got {self.target_clients!r}")

    def _check_target_domain(self) -> None:
        if isinstance(self.target_domain, str):
            require_nonempty("data.target_domain", self.target_domain)
            return
        if not 1 <= len(self.target_domain) <= MAX_TARGET_VALUES:
            raise ConfigError(f"data.target_domain lists {len(self.target_domain)} values; "
                              f"give 1 to {MAX_TARGET_VALUES} (or one string)")
        seen: set[str] = set()
        for i, value in enumerate(self.target_domain):
            require_nonempty(f"data.target_domain[{i}]", value)
            if value in seen:
                raise ConfigError(f"data.target_domain lists {value[:120]!r} twice")
            seen.add(value)

    @property
    def target_values(self) -> tuple[str, ...]:
        """The `domain_by` values of the target domain (empty with one domain)."""
        if not self.domain_by:
            return ()
        if isinstance(self.target_domain, str):
            return (self.target_domain,)
        return tuple(self.target_domain)

    @property
    def eval_domain(self) -> str:
        """Who a two-domain run's validation and test figures are about, in one line."""
        values = self.target_values
        if len(values) == 1:
            return f"{self.domain_by}={values[0]}"
        more = f", +{len(values) - 40} more" if len(values) > 40 else ""
        return f"{self.domain_by} in [{', '.join(values[:40])}{more}]"

    def _check_labels(self) -> None:
        if not self.labels:
            return
        if not 2 <= len(self.labels) <= MAX_LABELS:
            raise ConfigError(f"data.labels needs at least 2 and at most {MAX_LABELS} labels "
                              f"(a classifier's classes), got {len(self.labels)}")
        seen: dict[str, str] = {}
        for label in self.labels:
            if not label.strip() or len(label) > MAX_LABEL_CHARS or not label.isprintable():
                raise ConfigError(f"data.labels: {label!r} is empty, longer than "
                                  f"{MAX_LABEL_CHARS} characters or not printable")
            key = label.strip().casefold()  # as fedtune.data.labels.label_key
            if key in seen:
                twice = ("twice" if seen[key] == label else
                         f"beside {seen[key]!r}: they differ only in case or spaces")
                raise ConfigError(f"data.labels lists {label!r} {twice}")
            seen[key] = label

    @property
    def source_clients(self) -> int:
        return self.num_clients - self.target_clients if self.domain_by else 0


# Where each old flat `[tuning]` key lives now: a method's settings are its own table.
MOVED_TUNING_KEYS: dict[str, tuple[str, str]] = {
    "prompt_length": ("prompt", "length"), "prompt_lr_scale": ("prompt", "lr_scale"),
    "lora_r": ("lora", "r"), "lora_alpha": ("lora", "alpha"),
    "lora_targets": ("lora", "targets"), "lora_lr_scale": ("lora", "lr_scale"),
    "bitfit_lr_scale": ("bitfit", "lr_scale"),
    "slash_size": ("slash", "size"), "slash_seed": ("slash", "seed"),
    "slash_position": ("slash", "position"), "slash_lr_scale": ("slash", "lr_scale"),
}


@dataclass
class TuningConfig:
    """`[tuning]`: the method and what every method shares (the head). Each method's own
    settings are its `[tuning.<method>]` table, a dataclass registered with the method's
    spec (fedtune.config.methods for the built-in ones). Tables of methods other than the
    active one may be present (a sweep base can hold them); they are validated like the
    active one, so a typo fails at load, but only the active method's table shapes the model
    and enters the spec hash (`fingerprint`)."""

    method: str = "prompt"
    # Hidden width of the classification head; 0 means a single linear layer.
    head_hidden: int = 0
    # A federated domain classifier (target vs source) next to the task head, on the same
    # pooled features; the population-expansion plugin's importance weighting reads it.
    domain_head: bool = False
    # [tuning.<method>] tables by method name: the active method's always (defaults filled
    # in), other methods' only when given.
    methods: dict[str, Any] = field(default_factory=dict)

    def settings(self, name: str) -> Any:
        """Method `name`'s settings. The active method's table is always held (its defaults
        when the config gives none); another method without a table reads as a fresh copy
        of its defaults, so reading never changes the config."""
        if name in self.methods:
            return self.methods[name]
        defaults = method_spec(name, f"tuning.{name}").config()
        if name == self.method:
            self.methods[name] = defaults
        return defaults

    @property
    def active(self) -> Any:
        """The active method's settings."""
        return self.settings(self.method)

    def __setattr__(self, name: str, value: Any) -> None:
        # A stale `cfg.tuning.lora_r = 4` must fail, not set an attribute nothing reads.
        if name not in _TUNING_FIELDS:
            moved = MOVED_TUNING_KEYS.get(name)
            hint = f": use tuning.{moved[0]}.{moved[1]}" if moved else ""
            raise AttributeError(f"TuningConfig has no field {name!r}{hint}")
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        # `cfg.tuning.lora.r`: a method's table reads like a section. Only reached for
        # names that are no field; private names never are method names (copy, pickle).
        if name.startswith("_") or name in ("method", "methods"):
            raise AttributeError(name)
        if name not in method_names():
            raise AttributeError(f"TuningConfig has no field or tuning method {name!r}")
        return self.settings(name)

    def fingerprint(self) -> dict[str, Any]:
        """Everything here that shapes the model: the shared fields and the active
        method's table only, so another method's settings never change a run's spec hash."""
        settings = self.active
        # A method table may leave out a newer field at its default (`fingerprint()`), so
        # adding a setting does not change the spec hash of the runs made before it.
        own = getattr(settings, "fingerprint", None)
        return {**self._shared(), self.method: own() if own else dataclasses.asdict(settings)}

    def frozen_prefix(self) -> bool:
        """Whether the active method leaves blocks [0, L > 0) with nothing trainable (its
        table's `frozen_prefix()`; methods without one train every block)."""
        check = getattr(self.active, "frozen_prefix", None)
        return bool(check()) if check is not None else False

    def _shared(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "methods"}

    def to_dict(self) -> dict[str, Any]:
        self.settings(self.method)  # the active table is always written, defaults included
        return {**self._shared(), **{name: dataclasses.asdict(self.methods[name])
                                     for name in sorted(self.methods)}}

    def validate(self) -> None:
        method_spec(self.method)
        require_nonnegative("tuning.head_hidden", self.head_hidden)
        self.settings(self.method)  # fill in the active method's defaults
        for name, settings in self.methods.items():
            settings.validate(f"tuning.{name}")
            check_table_bounds(settings, f"tuning.{name}")


@dataclass
class TrainConfig:
    rounds: int = 8
    clients_per_round: int = 5
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 1.0
    # Round r trains at lr * lr_decay**(r-1): late cohorts of skewed clients then nudge the
    # converged model instead of swinging it.
    lr_decay: float = 0.85
    optimizer: str = "sgd"
    # Steps without DP-SGD clip the batch gradient to this norm (0 = off). train.lr is tuned
    # for DP-SGD, whose steps are clipped per example; an unclipped step at the same lr can
    # throw a run off (a pruned backbone's first round did). DP-SGD steps are not clipped
    # again.
    max_grad_norm: float = 1.0
    eval_batch_size: int = 128
    # Evaluate on at most this many examples of each split (the validation split every
    # round, the test split for the final model); 0 = the whole split.
    eval_max_examples: int = 0
    # How long the server waits for a round's replies before aggregating what came.
    round_timeout_s: float = 900.0
    # > 0: each client trains this many passes over its (possibly pruned) data per round,
    # ceil(epochs * n / batch_size) steps, instead of a fixed train.local_steps.
    local_epochs: float = 0.0
    # Frozen-prefix cache (fedtune.tuning.prefix_cache): when every trainable tensor sits
    # at or above block L, the states entering block L are computed once per example and
    # kept on disk ([runtime] cache_dir, bounded by prefix_cache_gb), and steps and the
    # server's evaluation start from them. "auto": on when the method allows it.
    prefix_cache: str = "auto"

    def validate(self) -> None:
        for name in ("rounds", "clients_per_round", "local_steps", "batch_size",
                     "eval_batch_size"):
            require_positive(f"train.{name}", getattr(self, name))
        require_positive("train.lr", self.lr)
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError(f"train.lr_decay must be in (0, 1], got {self.lr_decay!r}")
        require_positive("train.round_timeout_s", self.round_timeout_s)
        require_nonnegative("train.eval_max_examples", self.eval_max_examples)
        require_nonnegative("train.max_grad_norm", self.max_grad_norm)
        require_nonnegative("train.local_epochs", self.local_epochs)
        require_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        require_choice("train.prefix_cache", self.prefix_cache, PREFIX_CACHE)


@dataclass
class SampleDPConfig:
    """Record-level DP-SGD on each client (Opacus)."""

    enabled: bool = True
    target_epsilon: float = 8.0
    # 0 means: calibrate the noise from target_epsilon; > 0 uses this multiplier as given.
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"

    def validate(self) -> None:
        require_positive("privacy.sample.target_epsilon", self.target_epsilon)
        require_nonnegative("privacy.sample.noise_multiplier", self.noise_multiplier)
        require_positive("privacy.sample.max_grad_norm", self.max_grad_norm)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.sample.delta must be in (0, 1), got {self.delta!r}")
        require_choice("privacy.sample.accountant", self.accountant, ACCOUNTANTS)
        require_choice("privacy.sample.grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)


@dataclass
class UserDPConfig:
    """Client-level DP (DP-FedAvg): each client's delta is clipped to norm clip_norm, the
    clipped deltas are summed over a Poisson-sampled cohort (rate clients_per_round /
    num_clients) and divided by the expected cohort size, and Gaussian noise of std
    noise_multiplier * clip_norm / clients_per_round is added to the mean."""

    enabled: bool = False
    # Where deltas are clipped: "server" (the server clips what it receives) or "client"
    # (clients clip before sending; the server rejects any delta over the norm).
    clipping: str = "server"
    clip_norm: float = 5.0
    target_epsilon: float = 8.0
    # 0 means: calibrate from target_epsilon over train.rounds; > 0 uses this as given.
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    # Replies carry only what the server needs under user-level DP (delta, steps, DP spend):
    # no example count, loss, FLOPs or plugin figures leave the client.
    withhold_metrics: bool = False
    # The secret cohort and each client's figures (partition ids, norms, losses, counts)
    # are the curator's log (`curator_log.jsonl`); true also writes them into rounds.jsonl.
    log_cohorts: bool = False

    def validate(self) -> None:
        if self.withhold_metrics and not self.enabled:
            raise ConfigError("privacy.user.withhold_metrics needs privacy.user.enabled = true "
                              "(plain FedAvg weights clients by their example counts)")
        require_choice("privacy.user.clipping", self.clipping, ("server", "client"))
        require_positive("privacy.user.clip_norm", self.clip_norm)
        require_positive("privacy.user.target_epsilon", self.target_epsilon)
        require_nonnegative("privacy.user.noise_multiplier", self.noise_multiplier)
        low, high = sigma_range("rdp")  # user-level DP is accounted by RDP (privacy.user_level)
        if self.noise_multiplier and not low <= self.noise_multiplier <= high:
            # Below the floor the RDP accountant's arithmetic underflows and reports epsilon
            # 0 for no noise at all (review ATTACK32).
            raise ConfigError(f"privacy.user.noise_multiplier must be 0 (calibrated) or in "
                              f"[{low:g}, {high:g}], the range its RDP accountant is run on, "
                              f"got {self.noise_multiplier!r}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.user.delta must be in (0, 1), got {self.delta!r}")


@dataclass
class PrivacyConfig:
    sample: SampleDPConfig = field(default_factory=SampleDPConfig)
    user: UserDPConfig = field(default_factory=UserDPConfig)
    # DP noise and DP sampling come from the OS CSPRNG unless this is on: then they are
    # derived from `seed`, runs re-run bit for bit, and every epsilon is marked as holding
    # against nobody who has the config (fedtune.privacy.randomness). Simulation only.
    reproducible_noise: bool = False
    # Under sample-level DP (and smashed DP) replies carry no example count, real-row
    # count, FLOPs or loss: none is covered by epsilon. True sends them, and every
    # epsilon is then marked "counts disclosed" (fedtune.wire.fields).
    disclose_counts: bool = False

    def validate(self) -> None:
        self.sample.validate()
        self.user.validate()


@dataclass
class DeltaConfig:
    # How clients encode their delta for upload: float32 (exact), float16 or int8 (one
    # scale per tensor). The global vector always goes down as float32.
    encoding: str = "float32"

    def validate(self) -> None:
        require_choice("delta.encoding", self.encoding, ("float32", "float16", "int8"))


# Strategy plugins that weight clients' deltas: only the weighted `mean` rule uses weights.
CLIENT_WEIGHTING_PLUGINS = ("population_expansion",)
# [aggregation] rule: the names of `strategies.robust.RULES` (a test keeps them equal; the
# config imports nothing of the app layer).
AGGREGATION_RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum")
NORM_BOUND_MODES = ("off", "adaptive")
NORM_BOUND_CENTERS = ("zero", "median", "auto")
NORM_BOUND_DIRECTIONS = ("off", "median", "auto", "validation")
# What the validation check does with a row: "drop" the lowest below the threshold (at most
# `tolerate`), weight every row by max(0, cosine) ("cosine", FLTrust's trust score, before
# `mean`), or replace the lowest rows below the threshold, at most a minority of the round, by
# zero votes ("zero", before `median`).
DIRECTION_WEIGHTINGS = ("drop", "cosine", "zero")
# How many rows the direction check may drop (`direction_drop_limit`).
DIRECTION_DROP_LIMITS = ("tolerate", "majority")
# The rules the direction check can run before: it drops rows, and these two take a subset
# (the coordinate-wise and Krum rules count each kept row once as well, but are not measured
# with it).
DIRECTION_RULES = ("mean", "median")
# The most validation rows the server's reference direction may read (one backward pass
# each, every round).
REFERENCE_ROWS_MAX = 4096
ADAPTIVE_FACTOR_MAX = 1e3
ATTACK_SCALE_MAX = 1e9


@dataclass
class AggregationConfig:
    """`[aggregation]`: how the server combines the cohort's deltas without user-level DP
    (strategies.robust). A norm bound scales each delta down to `norm_bound` (or to
    `adaptive_factor` x the cohort's median norm with "adaptive") before the rule runs; with
    `norm_bound_direction = "median"` the bounded rows pointing away from the coordinate-wise
    median of the other rows (cosine below `direction_min_cosine`, at most `tolerate` rows, the
    lowest) are then dropped from the mean (strategies.robust.direction_check); with
    "validation" the reference is the server's own validation descent direction instead, and
    the check also runs before `median`."""

    rule: str = "mean"
    # "off", "adaptive", or a number > 0 (an L2 norm).
    norm_bound: float | int | str = "off"
    adaptive_factor: float = 1.0
    # What the bound is measured from: "zero" bounds each delta's norm (one client moves
    # the mean by at most bound / n); "median" bounds each delta's distance from the
    # cohort's coordinate-wise median (centred clipping), which also bounds a client that
    # sends the honest step reversed (the adaptive bound is then the median distance).
    # "auto": the server picks from its own privacy setting (`for_sample_dp`): "median"
    # when its clients run sample-level DP-SGD (their deltas are noise around a shared step,
    # and the median is a good centre), "zero" without it (non-IID deltas spread about as
    # wide as they are long, so a centred bound lets a reversed step through; benchmarks/
    # RESULTS.md, the robust section).
    norm_bound_center: str = "zero"
    # A direction check after the bound (with `mean`): "median" drops from the mean the rows
    # whose cosine to the coordinate-wise median of the other bounded rows is below
    # `direction_min_cosine`, at most `tolerate` of them (the lowest), so a client that
    # sends the honest step reversed no longer cancels an honest client's step; the bound
    # still holds for every kept row. "off": no check. "auto" (`for_sample_dp`): "median"
    # without sample-level DP-SGD, "off" with it (the clients' DP noise swamps the direction:
    # an honest row can score lowest and be dropped; benchmarks/RESULTS.md, the robust
    # section).
    # "validation": the reference is the server's own descent direction, the negative
    # gradient of the validation loss at the global model on the first
    # `direction_reference_rows` validation rows (FLTrust's root set, Cao et al. 2021),
    # which no client moves within the round (kept rows move the model it is taken at next
    # round); every row is checked against it, and it runs before
    # `mean` (with a norm bound) or before `median` (with or without one). It needs a
    # validation split (data.validation_fraction > 0). The released model then depends on
    # those rows, which no DP mechanism covers (docs/privacy.md).
    norm_bound_direction: str = "off"
    direction_min_cosine: float = 0.0
    # "validation": how many validation rows (the split's first) the reference reads.
    direction_reference_rows: int = 64
    # "validation" before `mean` with a norm bound: "drop" (the check above), or "cosine":
    # no row dropped, each bounded row weighted by its server-owned weight x max(0, cosine
    # to the server's direction) (FLTrust's trust score, strategies.trust_weighting), each
    # row's share of the round capped at 1 / (cohort - tolerate) and not renormalized; a
    # round where every weight is 0 makes no update. One row moves the model by at most
    # the norm bound / (cohort - tolerate).
    # "zero", with "validation" before `median` (with or without a norm bound): no row
    # dropped, the rows below `direction_min_cosine` replaced by zero rows, votes for no
    # change, the lowest first and at most a minority of the round (strategies.zero_vote);
    # the median of all the round's rows stays within the range of the honest rows and 0
    # whichever rows are zeroed (zeros are the server's own), n >= 2 x tolerate + 1; zeroed
    # honest rows let the attackers hold chosen coordinates at 0 (no change).
    direction_weighting: str = "drop"
    # How many rows the validation check may drop before `median`: "tolerate" (at most
    # `tolerate`, the lowest cosines first) or "majority" (every row below the threshold,
    # the lowest first, as long as 2 x tolerate + 1 rows are left: the median of the rows
    # kept still has an honest majority with at most `tolerate` attackers among them (a
    # reversed row scoring above the honest rows dropped may stay; the bound holds).
    direction_drop_limit: str = "tolerate"
    # trimmed_mean: the share of values cut at each end of every coordinate, in [0, 0.5).
    trim_beta: float = 0.2
    # krum / multi_krum: the number of attackers assumed; multi_krum averages the best
    # multi_krum_m deltas (0 = cohort - krum_f).
    krum_f: int = 1
    multi_krum_m: int = 0
    # median, trimmed_mean and the adaptive bound: the attackers f the round must tolerate.
    # A round with fewer deltas than the rule needs for f is refused (`shortfall`).
    tolerate: int = 1

    def validate(self) -> None:
        require_choice("aggregation.rule", self.rule, AGGREGATION_RULES)
        if isinstance(self.norm_bound, str):
            if self.norm_bound not in NORM_BOUND_MODES:
                raise ConfigError(f"aggregation.norm_bound={self.norm_bound!r} must be a number "
                                  "> 0, 'adaptive' or 'off'")
        else:
            require_finite("aggregation.norm_bound", self.norm_bound)
            require_positive("aggregation.norm_bound", self.norm_bound)
            self.norm_bound = float(self.norm_bound)
        require_choice("aggregation.norm_bound_center", self.norm_bound_center,
                       NORM_BOUND_CENTERS)
        if self.norm_bound_center != "zero" and self.norm_bound == "off":
            raise ConfigError(f"aggregation.norm_bound_center={self.norm_bound_center!r} "
                              "measures a norm bound: set aggregation.norm_bound to "
                              "'adaptive' or a number")
        self._validate_direction()
        if not 0.0 < self.adaptive_factor <= ADAPTIVE_FACTOR_MAX:
            raise ConfigError(f"aggregation.adaptive_factor must be in (0, "
                              f"{ADAPTIVE_FACTOR_MAX:g}], got {self.adaptive_factor!r}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"aggregation.trim_beta must be in [0, 0.5), got "
                              f"{self.trim_beta!r}")
        require_nonnegative("aggregation.krum_f", self.krum_f)
        require_nonnegative("aggregation.multi_krum_m", self.multi_krum_m)
        require_nonnegative("aggregation.tolerate", self.tolerate)

    def _validate_direction(self) -> None:
        key = "aggregation.norm_bound_direction"
        require_choice(key, self.norm_bound_direction, NORM_BOUND_DIRECTIONS)
        require_finite("aggregation.direction_min_cosine", self.direction_min_cosine)
        if not -1.0 < self.direction_min_cosine < 1.0:
            # -1: no cosine is below it, so the check would drop nothing.
            raise ConfigError(f"aggregation.direction_min_cosine must be in (-1, 1), got "
                              f"{self.direction_min_cosine!r}")
        if (not isinstance(self.direction_reference_rows, int)
                or isinstance(self.direction_reference_rows, bool)
                or not 1 <= self.direction_reference_rows <= REFERENCE_ROWS_MAX):
            raise ConfigError(f"aggregation.direction_reference_rows must be an integer in "
                              f"[1, {REFERENCE_ROWS_MAX}], got "
                              f"{self.direction_reference_rows!r}")
        self._validate_weighting()
        self._validate_drop_limit()
        if self.norm_bound_direction == "off":
            return
        if self.norm_bound_direction == "validation":
            self._validate_validation_direction(key)
            return
        if self.norm_bound == "off":
            raise ConfigError(f"{key}={self.norm_bound_direction!r} checks the rows of a norm "
                              "bound: set aggregation.norm_bound to 'adaptive' or a number")
        if self.rule != "mean":
            raise ConfigError(f"{key}={self.norm_bound_direction!r} drops rows from the mean: "
                              f"it needs aggregation.rule='mean', got {self.rule!r}")
        if self.tolerate < 1:
            # It drops at most `tolerate` rows: with 0 it would check and drop nothing.
            raise ConfigError(f"{key}={self.norm_bound_direction!r} drops at most "
                              "aggregation.tolerate rows: set aggregation.tolerate >= 1")

    def _validate_weighting(self) -> None:
        """"cosine" weights rows by their cosine to the server's validation direction in
        place of the weighted mean; it needs a norm bound (its per-row bound is the norm
        bound times the share cap), has no threshold, and drops no row (`tolerate` sets its
        share cap, 1 / (cohort - tolerate), so 0 is allowed: 1 / cohort)."""
        key = "aggregation.direction_weighting"
        require_choice(key, self.direction_weighting, DIRECTION_WEIGHTINGS)
        if self.direction_weighting == "drop":
            return
        if self.direction_weighting == "zero":
            self._validate_zero_vote(key)
            return
        if (self.norm_bound_direction != "validation" or self.rule != "mean"
                or self.norm_bound == "off"):
            raise ConfigError(f"{key}='cosine' needs aggregation.norm_bound_direction="
                              f"'validation', aggregation.rule='mean' and aggregation.norm_bound "
                              f"set, got norm_bound_direction={self.norm_bound_direction!r}, "
                              f"rule={self.rule!r}, norm_bound={self.norm_bound!r}")
        if self.direction_min_cosine != 0.0:
            raise ConfigError(f"{key}='cosine' weights each row by max(0, cosine) and has no "
                              f"threshold: aggregation.direction_min_cosine must stay 0, got "
                              f"{self.direction_min_cosine!r}")

    def _validate_zero_vote(self, key: str) -> None:
        """"zero" replaces rows before the median with zero votes: only the median keeps its
        bound over them (a mean would count the zeros as rows with weights); it drops
        nothing, so a drop limit means nothing with it."""
        if self.norm_bound_direction != "validation" or self.rule != "median":
            raise ConfigError(f"{key}='zero' needs aggregation.norm_bound_direction="
                              f"'validation' and aggregation.rule='median', got "
                              f"norm_bound_direction={self.norm_bound_direction!r}, "
                              f"rule={self.rule!r}")
        if self.direction_drop_limit != "tolerate":
            raise ConfigError(f"{key}='zero' drops no row: aggregation.direction_drop_limit "
                              f"must stay 'tolerate', got {self.direction_drop_limit!r}")

    def _validate_drop_limit(self) -> None:
        """"majority" lets the check drop more than `tolerate` rows; only the median of the
        rows left holds its bound whatever rows those are (a mean's kept rows would take
        larger shares), so it needs the validation check before `median`."""
        key = "aggregation.direction_drop_limit"
        require_choice(key, self.direction_drop_limit, DIRECTION_DROP_LIMITS)
        if self.direction_drop_limit == "majority" and (
                self.norm_bound_direction != "validation" or self.rule != "median"):
            raise ConfigError(f"{key}='majority' needs aggregation.norm_bound_direction="
                              f"'validation' and aggregation.rule='median', got "
                              f"norm_bound_direction={self.norm_bound_direction!r}, "
                              f"rule={self.rule!r}")

    @staticmethod
    def zero_limit(rows: int) -> int:
        """The most rows of a round the zero vote may zero: a minority, so that the median
        of the round is never 0 by the server's votes alone (strategies.zero_vote)."""
        return max(rows - 1, 0) // 2

    def drop_limit(self, rows: int) -> int:
        """The most rows the direction check may drop from `rows`."""
        if self.direction_drop_limit == "majority":
            return max(rows - (2 * self.tolerate + 1), 0)
        return self.tolerate

    def _validate_validation_direction(self, key: str) -> None:
        """The check against the server's validation direction: before `mean` with a norm
        bound (without one a boosted row that points the right way takes the mean) or
        before `median`; dropping, it drops at most `tolerate` rows, so `tolerate` >= 1 (the
        trust weighting and the zero vote drop none and allow 0)."""
        if self.rule not in DIRECTION_RULES:
            raise ConfigError(f"{key}='validation' drops rows before the rule: it needs "
                              f"aggregation.rule in {', '.join(DIRECTION_RULES)}, got "
                              f"{self.rule!r}")
        if self.rule == "mean" and self.norm_bound == "off":
            raise ConfigError(f"{key}='validation' with aggregation.rule='mean' needs a norm "
                              "bound (a boosted row that points the validation way would "
                              "take the mean): set aggregation.norm_bound to 'adaptive' or a "
                              "number")
        if self.tolerate < 1 and self.direction_drop_limit == "majority":
            # It keeps 2 x tolerate + 1 rows: with 0, the median of one row.
            raise ConfigError("aggregation.direction_drop_limit='majority' keeps 2 x "
                              "aggregation.tolerate + 1 rows for the median (with 0, a single "
                              "row): set aggregation.tolerate >= 1")
        if self.tolerate < 1 and self.direction_weighting == "drop":
            raise ConfigError(f"{key}='validation' drops at most aggregation.tolerate rows: "
                              "set aggregation.tolerate >= 1")

    @property
    def default(self) -> bool:
        """Plain FedAvg: the weighted mean, no bound, no row dropped."""
        return (self.rule == "mean" and self.norm_bound == "off"
                and self.norm_bound_direction == "off")

    def trimmed_per_side(self, n: int) -> int:
        """trimmed_mean's cut at each end of every coordinate of n deltas: floor(beta x n),
        but never fewer than the `tolerate` attackers (a smaller cohort would trim none)."""
        return max(self.tolerate, int(self.trim_beta * n))

    def shortfall(self, n: int, label: str) -> str | None:
        """Why n deltas (`label` names the count) are too few for the rule and bound to
        hold against their attackers, or None. The one test of both the configured cohort
        (`check_cohort`) and each round's replies (strategies.robust refuses the update)."""
        f = self.tolerate
        if self.norm_bound == "adaptive" and n < 2 * f + 1:
            # The median norm is an honest one only while honest deltas are the majority.
            return (f"aggregation.norm_bound='adaptive' tolerates aggregation.tolerate={f} "
                    f"only with {label} >= 2 x tolerate + 1 = {2 * f + 1}, got {n}")
        if self.norm_bound_center in ("median", "auto") and n < 2 * f + 1:
            # "auto" unresolved (the config at load): the median's need, the stricter one.
            return (f"aggregation.norm_bound_center={self.norm_bound_center!r} tolerates "
                    f"aggregation.tolerate={f} only with {label} >= 2 x tolerate + 1 = "
                    f"{2 * f + 1}, got {n}")
        if self.norm_bound_direction in ("median", "auto") and n < 2 * f + 2:
            # A row's reference is the median of the n - 1 others: inside the honest range
            # only while the honest rows are a strict majority of those (review ATTACK27D:
            # at n = 2f + 1 the attackers are half of an honest row's others and turn its
            # reference against it).
            return (f"aggregation.norm_bound_direction={self.norm_bound_direction!r} "
                    f"tolerates aggregation.tolerate={f} only with {label} >= 2 x tolerate + "
                    f"2 = {2 * f + 2} (each row's reference, the median of the others, needs "
                    f"an honest majority), got {n}")
        if (self.norm_bound_direction == "validation" and self.rule == "median"
                and self.direction_weighting == "drop"
                and self.direction_drop_limit == "tolerate" and n < 3 * f + 1):
            # The check may drop f honest rows (attackers that point the validation way
            # are kept): the median then needs an honest majority of the n - f left.
            return (f"aggregation.norm_bound_direction='validation' before aggregation.rule="
                    f"'median' tolerates aggregation.tolerate={f} only with {label} >= 3 x "
                    f"tolerate + 1 = {3 * f + 1} (the median of the rows the check keeps "
                    f"needs an honest majority), got {n}")
        if (self.norm_bound_direction == "validation" and self.direction_weighting == "drop"
                and n <= f):
            # It may drop up to `tolerate` rows: with no more rows it may drop them all.
            return (f"aggregation.norm_bound_direction='validation' drops up to aggregation."
                    f"tolerate rows and needs {label} > tolerate = {f}, got {n}")
        if self.direction_weighting == "cosine" and n <= f:
            # Its share cap, 1 / (cohort - tolerate), needs more rows than attackers.
            return (f"aggregation.direction_weighting='cosine' caps each row's share at 1 / "
                    f"(cohort - aggregation.tolerate) and needs {label} > tolerate = {f}, "
                    f"got {n}")
        if self.rule == "median" and n < 2 * f + 1:
            return (f"aggregation.rule='median' tolerates aggregation.tolerate={f} only with "
                    f"{label} >= 2 x tolerate + 1 = {2 * f + 1}, got {n}")
        if self.rule == "trimmed_mean":
            cut = self.trimmed_per_side(n)
            if cut == 0:
                return (f"aggregation.trim_beta={self.trim_beta} with aggregation.tolerate=0 "
                        f"trims no delta from {label}={n} (it cuts max(tolerate, floor(beta "
                        f"x cohort)) per side); set aggregation.tolerate >= 1")
            if n <= 2 * cut:
                return (f"aggregation.rule='trimmed_mean' cuts {cut} per side (max(aggregation."
                        f"tolerate={f}, floor(trim_beta={self.trim_beta} x {n}))) and needs "
                        f"{label} > {2 * cut}, got {n}")
        if self.rule in ("krum", "multi_krum") and n < 2 * self.krum_f + 3:
            return (f"aggregation.krum_f={self.krum_f} needs {label} >= 2 x krum_f + 3 = "
                    f"{2 * self.krum_f + 3}, got {n}")
        if self.rule == "multi_krum" and self.multi_krum_m > n - self.krum_f:
            return (f"aggregation.multi_krum_m={self.multi_krum_m} must be <= {label} - "
                    f"aggregation.krum_f = {n - self.krum_f}")
        return None

    def for_sample_dp(self, sample_dp: bool) -> AggregationConfig:
        """The settings the server aggregates with: `norm_bound_center` and
        `norm_bound_direction` "auto" resolved from whether the clients run sample-level
        DP-SGD (`privacy.sample.enabled`, the server's own config, never a client's claim):
        the centre "median" with it and "zero" without; the direction check "off" with it
        and "median" without. A copy: the config keeps "auto"."""
        resolved = {}
        if self.norm_bound_center == "auto":
            resolved["norm_bound_center"] = "median" if sample_dp else "zero"
        if self.norm_bound_direction == "auto":
            resolved["norm_bound_direction"] = "off" if sample_dp else "median"
        return dataclasses.replace(self, **resolved) if resolved else self

    def check_cohort(self, cohort: int) -> None:
        """The rule's parameters against the configured cohort size (each round's replies
        are checked again at aggregation: clients drop)."""
        reason = self.shortfall(cohort, "train.clients_per_round")
        if reason is not None:
            raise ConfigError(reason)
        if self.direction_weighting == "zero" and self.zero_limit(cohort) < 1:
            # A round of one or two rows may hold no zero vote (review ATTACK34): a defence
            # that never acts, as the drop check with nothing to drop is refused.
            raise ConfigError("aggregation.direction_weighting='zero' zeroes at most "
                              "floor((rows - 1) / 2) rows a round, none of "
                              f"train.clients_per_round={cohort}: it needs at least 3")


@dataclass
class AttackSimulationConfig:
    """`[faults.attack_simulation]`, for benchmarks and tests only: the clients of the
    partitions listed send `scale` x their honest delta ("boost") or -`scale` x it ("flip")
    instead of it (clients.faults.attack), or fail every round before training
    ("withhold": the honest run without those partitions, the floor of a defence that
    excludes them; `scale` unused)."""

    kind: str = "none"
    scale: float = 10.0
    partitions: list[int] = field(default_factory=list)

    def validate(self) -> None:
        require_choice("faults.attack_simulation.kind", self.kind,
                       ("none", "flip", "boost", "withhold"))
        if not 0.0 < self.scale <= ATTACK_SCALE_MAX:
            raise ConfigError(f"faults.attack_simulation.scale must be in (0, "
                              f"{ATTACK_SCALE_MAX:g}], got {self.scale!r}")
        if self.kind != "none" and not self.partitions:
            raise ConfigError(f"faults.attack_simulation.kind={self.kind!r} needs "
                              "faults.attack_simulation.partitions (the attackers' ids)")


@dataclass
class FaultConfig:
    """Fault injection for robustness tests: each sampled client independently (seeded)
    crashes with probability crash_p, hangs for hang_s seconds (then fails, without
    training) with probability hang_p, or replies with a corrupt delta (NaN values, wrong
    length or a wrong spec hash) with probability garbage_p."""

    crash_p: float = 0.0
    garbage_p: float = 0.0
    hang_p: float = 0.0
    hang_s: float = 60.0
    attack_simulation: AttackSimulationConfig = field(
        default_factory=lambda: AttackSimulationConfig())

    def validate(self) -> None:
        self.attack_simulation.validate()
        names = ("crash_p", "garbage_p", "hang_p")
        for name in names:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"faults.{name} must be in [0, 1], got {value!r}")
        if sum(getattr(self, n) for n in names) > 1.0:
            raise ConfigError("faults.crash_p + faults.garbage_p + faults.hang_p must be <= 1")
        require_positive("faults.hang_s", self.hang_s)


@dataclass
class SmashedDPConfig:
    """DP on what crosses the cut upward in split mode: every per-example cut-layer
    activation and every per-example gradient at the body output is clipped to a norm and
    gets Gaussian noise before it leaves the client (fedtune.split.smashed_dp). Each split
    step is one Poisson-subsampled Gaussian release on the DP-SGD batch, composed with
    DP-SGD's into the client's data-level epsilon; needs privacy.sample.enabled."""

    enabled: bool = False
    # L2 bound on one example's cut-layer activations (all positions together) and on the
    # gradient of its own loss at the body output.
    activation_clip_norm: float = 1.0
    gradient_clip_norm: float = 1.0
    # Budget the smashed-data noise alone is calibrated to over the run's planned split
    # steps (noise_multiplier = 0: calibrate); the reported epsilon joins it with DP-SGD's.
    target_epsilon: float = 8.0
    noise_multiplier: float = 0.0

    def validate(self) -> None:
        for name in ("activation_clip_norm", "gradient_clip_norm", "target_epsilon"):
            require_positive(f"split.smashed_dp.{name}", getattr(self, name))
        require_nonnegative("split.smashed_dp.noise_multiplier", self.noise_multiplier)


@dataclass
class SplitConfig:
    """Split learning (SFPrompt): the client runs the embeddings, the prompt and the first
    cut_layer layers (the head) plus the last tail_layers layers, the final norm and the
    output (pooling + classifier, or a causal LM's LM head: the tail); the server runs the
    frozen layers between them (the body). Only the prompt + tail deltas are federated."""

    enabled: bool = False
    # Layers on the client before the cut; 0 leaves it only the embedding stage and the prompt.
    cut_layer: int = 1
    # Last layers run on the client after the body (with the final norm); 0 = none.
    tail_layers: int = 0
    # Share of each round's local steps that train on a local loss (a small auxiliary
    # classifier on cut-layer features) with no server round-trip; the rest are split
    # steps. Must leave at least one split step, so the tail and the prompt synchronise.
    local_loss_fraction: float = 0.0
    smashed_dp: SmashedDPConfig = field(default_factory=lambda: SmashedDPConfig())

    def validate(self) -> None:
        require_nonnegative("split.cut_layer", self.cut_layer)
        require_nonnegative("split.tail_layers", self.tail_layers)
        self.smashed_dp.validate()
        if not 0.0 <= self.local_loss_fraction < 1.0:
            raise ConfigError(
                f"split.local_loss_fraction must be in [0, 1), got {self.local_loss_fraction!r}")


@dataclass
class SimulationConfig:
    backend: str = "ray"
    # CPUs given to the whole simulation (0 = all cores of this machine).
    num_cpus: int = 0
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    # Address of an existing Ray cluster; empty starts a local one.
    ray_address: str = ""

    def validate(self) -> None:
        require_choice("simulation.backend", self.backend, ("ray",))
        require_nonnegative("simulation.num_cpus", self.num_cpus)
        require_positive("simulation.num_cpus_per_client", self.num_cpus_per_client)
        require_nonnegative("simulation.num_gpus_per_client", self.num_gpus_per_client)


@dataclass
class ExperimentConfig:
    name: str = "quickstart"
    seed: int = 0
    # What the run learns (`[task] kind`: classification, causal_lm; fedtune.config.task).
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    # Poll intervals and the cache folder (environment variables override them).
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # Strategy plugins, in order: [[plugins]] tables with a `name` and the plugin's params.
    plugins: list[dict[str, Any]] = field(default_factory=list)

    def validate(self) -> None:
        check_name(self.name)
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"seed must be in [0, {SEED_MAX}], got {self.seed!r}")
        for section in (self.task, self.model, self.data, self.tuning, self.train, self.privacy,
                        self.delta, self.faults, self.aggregation, self.split,
                        self.simulation, self.runtime):
            section.validate()
        check_bounds(self)  # after the sections' own rules, before any cross-section rule
        # The task kind's rules (what a causal-LM run cannot do yet) first: a plugin setting
        # the kind cannot take is refused for that reason, not for a setting it asks next.
        check_task(self)
        # Checks the app layer registered (strategies.plugins: plugin names and params),
        # then whether the method composes with each plugin (which also refuses an unknown
        # name when the app layer is not loaded).
        for check in config_checks():
            check(self)
        self._validate_method_plugins()
        self._validate_method_grad_mode()
        if self.faults.hang_p > 0 and self.faults.hang_s <= self.train.round_timeout_s:
            raise ConfigError(
                f"faults.hang_s={self.faults.hang_s} must exceed train.round_timeout_s="
                f"{self.train.round_timeout_s}: a hang shorter than the timeout is a slow reply"
            )
        self._validate_aggregation()
        check_user_unit(self)  # one user is never two clients under user-level DP
        if self.split.enabled:
            self._validate_split()
        self._validate_prefix_cache()
        if self.train.clients_per_round > self.data.num_clients:
            raise ConfigError(
                f"train.clients_per_round={self.train.clients_per_round} exceeds "
                f"data.num_clients={self.data.num_clients}"
            )

    def _validate_method_plugins(self) -> None:
        allowed = method_spec(self.tuning.method).plugins
        first: dict[str, int] = {}
        for i, table in enumerate(self.plugins):
            name = table.get("name")
            if name not in allowed:
                raise ConfigError(
                    f"plugins[{i}].name={name!r} does not compose with tuning.method="
                    f"{self.tuning.method!r}; it composes with: {', '.join(allowed) or 'none'}")
            if name in first:
                # One instruction carries one setting per plugin (the last table's would
                # win) while the server would plan both: a client's charge and what it
                # trains on part ways (ATTACK29H).
                raise ConfigError(f"plugins[{i}].name={name!r} repeats plugins[{first[name]}]: "
                                  "a plugin runs once per run; merge the two tables")
            first[name] = i

    def _validate_method_grad_mode(self) -> None:
        mode = self.privacy.sample.grad_sample_mode
        refused = dict(method_spec(self.tuning.method).refused_grad_modes)
        if self.privacy.sample.enabled and mode in refused:
            raise ConfigError(
                f"privacy.sample.grad_sample_mode={mode!r} does not work with tuning.method="
                f"{self.tuning.method!r}: {refused[mode]}; use 'hooks' (the default) or "
                "'functorch'")

    def _validate_aggregation(self) -> None:
        self.aggregation.check_cohort(self.train.clients_per_round)
        for i, table in enumerate(self.plugins):
            if table.get("name") in CLIENT_WEIGHTING_PLUGINS and self.aggregation.rule != "mean":
                # Its weights (< 1 for source clients, 0 = left out) are ignored by the
                # coordinate-wise and Krum rules, and the cohort shrinks below the checked size.
                raise ConfigError(
                    f"aggregation.rule={self.aggregation.rule!r} does not compose with "
                    f"plugins[{i}].name={table['name']!r}, which weights clients; use "
                    "aggregation.rule='mean' (with an aggregation.norm_bound)")
        if (self.aggregation.norm_bound_direction == "validation"
                and self.data.validation_fraction == 0):
            raise ConfigError("aggregation.norm_bound_direction='validation' needs the "
                              "server's validation split: set data.validation_fraction > 0")
        for i, pid in enumerate(self.faults.attack_simulation.partitions):
            if not 0 <= pid < self.data.num_clients:
                raise ConfigError(f"faults.attack_simulation.partitions[{i}]={pid} must be in "
                                  f"[0, data.num_clients={self.data.num_clients})")
        if self.privacy.user.enabled and not self.aggregation.default:
            # User-level DP's sensitivity (one client moves the release by at most C /
            # cohort) is proven for the clipped sum only: its clip is the norm bound.
            raise ConfigError(
                "aggregation.rule and aggregation.norm_bound must stay 'mean' and 'off' with "
                "privacy.user.enabled=true: user-level DP clips every delta to "
                "privacy.user.clip_norm and its epsilon holds for that sum only")

    def _validate_prefix_cache(self) -> None:
        if self.train.prefix_cache != "on":
            return
        if self.split.enabled:
            raise ConfigError("train.prefix_cache='on' does not work with split.enabled=true "
                              "(the client runs its layers on fresh inputs); use 'auto' or "
                              "'off'")
        if not self.tuning.frozen_prefix():
            raise ConfigError(
                f"train.prefix_cache='on' needs a method with a frozen prefix, but "
                f"tuning.method={self.tuning.method!r} as configured trains the first block "
                "(set [tuning.prompt] layer, [tuning.lora|bitfit] from_layer > 0, or use "
                "method 'head'); or set train.prefix_cache to 'auto' or 'off'")

    def _validate_split(self) -> None:
        if not method_spec(self.tuning.method).split:
            able = [m for m in method_names() if method_spec(m).split]
            raise ConfigError(
                f"split.enabled=true needs tuning.method in: {', '.join(able)} (got "
                f"{self.tuning.method!r}): its trainable tensors must sit before the cut")
        if self.tuning.frozen_prefix():
            raise ConfigError(
                f"split.enabled=true needs tuning.method={self.tuning.method!r} to start at "
                "the word embeddings (the split client splices it in before its layers), "
                f"but [tuning.{self.tuning.method}] starts at a later block; set its layer "
                "to 0")
        if self.privacy.sample.enabled and self.privacy.sample.grad_sample_mode == "ghost":
            raise ConfigError(
                "split.enabled=true does not work with privacy.sample.grad_sample_mode="
                "'ghost': ghost clipping owns the loss's backward, but a split step "
                "back-propagates a gradient returned by the server; use one of: "
                + ", ".join(m for m in GRAD_SAMPLE_MODES if m != "ghost"))
        if self.split.smashed_dp.enabled and not self.privacy.sample.enabled:
            raise ConfigError(
                "split.smashed_dp.enabled=true needs privacy.sample.enabled=true: the smashed "
                "data is released on DP-SGD's Poisson batches, and without DP-SGD the deltas "
                "carry the data in clear, so no data-level epsilon exists")
        scoring = [p["name"] for p in self.plugins if p.get("name") == "el2n_pruning"]
        if self.split.smashed_dp.enabled and scoring:
            raise ConfigError(
                "split.smashed_dp.enabled=true does not work with the el2n_pruning plugin: "
                "its scoring pass sends every local example's activations through the "
                "server body without noise; drop the plugin or smashed DP")
        steps = self.train.local_steps
        if (self.train.local_epochs == 0 and self.split.local_loss_fraction > 0
                and int(self.split.local_loss_fraction * steps) == 0):
            raise ConfigError(
                f"split.local_loss_fraction={self.split.local_loss_fraction} of "
                f"train.local_steps={steps} rounds down to no local-loss step; raise it to "
                f">= {1 / steps:.3g} or set it to 0")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tuning"] = self.tuning.to_dict()  # method tables as [tuning.<method>]
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


_TUNING_FIELDS = frozenset(f.name for f in dataclasses.fields(TuningConfig))
