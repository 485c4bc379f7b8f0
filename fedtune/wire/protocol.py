"""The wire protocol between the ServerApp and a ClientApp: every message as a typed dataclass
with `to_record()` / `from_record()`. No other module names a message's record keys.

Server -> client: `PartitionQuery` (which partition do you hold?) and `TrainInstruction`
(the global vector and everything the round asks of the client). Client -> server:
`PartitionReply` and `TrainReply` (a delta and what the client reports about its round).

The server trusts nothing a client sends. `from_record` of a reply checks every field for
type, finiteness, range and size, rejects unknown keys, and raises `ProtocolError` naming
the first problem. A reply has no field the server owns: node, partition id, bytes, delta
norm, weight and privacy spend are computed by the server (`SERVER_OWNED`), so no reply can
set them. What a client reports about its own DP spend is kept apart as `ReportedDP`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.privacy import DPHistory
from fedtune.wire.delta import DeltaSpec, decode, encode
from fedtune.wire.figures import (
    FIGURE_TYPES,
    ImportanceFigures,
    PruningFigures,
    PruningSplitFigures,
    SplitFigures,
)

# Ledger keys the server computes for every client; the protocol has no field by these names.
SERVER_OWNED = frozenset({"node", "partition_id", "bytes_up", "delta_norm", "weight",
                          "reason", "reported_dp"})
# Sanity bounds on what a client reports: far above any real run, far below what breaks
# arithmetic (a float sum of 1e9 clients at these bounds stays finite).
MAX_COUNT = 10**12
MAX_FLOAT = 1e30
# (sigma, q, steps) entries in one client's DP history. A real history has one entry per
# change of (sigma, q): a few per run. The server never runs the accountant on a reported
# history (it charges from its own plan); the bound keeps the record it logs small.
MAX_HISTORY = 64
MAX_NOISE = 1e6
# Examples a node may declare at discovery for its own data file (`PartitionReply`): far
# above a device's fine-tuning set, and the weight and DP plan of a node come from it.
MAX_NODE_EXAMPLES = 10**7
# Characters of any client-controlled text (names, reasons, array metadata) that reach a
# rejection reason or a log line (`bounded`).
MAX_SHOWN = 200


class ProtocolError(ValueError):
    """A message does not follow the protocol; the text names the first thing wrong."""


# -- field rules -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Scalar:
    """One reported number: its wire key, its ledger name, its type and range."""

    key: str
    name: str
    kind: type  # int or float
    low: float = 0.0
    high: float = MAX_FLOAT
    above_low: bool = False  # the range is (low, high] instead of [low, high]

    def check(self, value: object) -> int | float:
        if self.kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ProtocolError(f"{self.key} must be an int, got {_show(value)}")
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ProtocolError(f"{self.key} must be a number, got {_show(value)}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{self.key} must be finite, got {value!r}")
        low_ok = value > self.low if self.above_low else value >= self.low
        if not (low_ok and value <= self.high):
            bracket = "(" if self.above_low else "["
            raise ProtocolError(f"{self.key} must be in {bracket}{self.low:g}, {self.high:g}], "
                                f"got {_show(value)}")
        return int(value) if self.kind is int else float(value)


@dataclass(frozen=True)
class Series:
    """A reported list of numbers, bounded in length, every item checked by `item`."""

    key: str
    item: Scalar

    def check(self, value: object) -> list:
        if not isinstance(value, list):
            raise ProtocolError(f"{self.key} must be a list, got {_show(value)}")
        if len(value) > MAX_HISTORY:
            raise ProtocolError(f"{self.key} holds {len(value)} items, at most {MAX_HISTORY}")
        return [self.item.check(v) for v in value]


def bounded(text: object, limit: int = MAX_SHOWN) -> str:
    """`text` as it may appear in a rejection reason or a log line: client-controlled text
    (key names, array metadata, error messages) is cut to `limit` characters, and the cut
    says how long the original was, so a 5 MB string costs a reason of ~250 bytes."""
    shown = str(text)
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}... ({len(shown):,} characters)"


def _names(keys: object) -> list[str]:
    """At most five of a client's key names, each cut to 40 characters, for a reason line."""
    names = sorted(str(k)[:41] for k in keys)  # type: ignore[attr-defined]
    return [k if len(k) <= 40 else k[:40] + "..." for k in names[:5]]


def _show(value: object) -> str:
    return f"{bounded(type(value).__name__, 40)} {bounded(repr(value), 40)}"


def _count(key: str, name: str, low: int = 0) -> Scalar:
    return Scalar(key, name, int, low, MAX_COUNT)


def _amount(key: str, name: str, low: float = 0.0, above_low: bool = False) -> Scalar:
    return Scalar(key, name, float, low, MAX_FLOAT, above_low)


# What every training client reports (unless the server asked it to withhold it).
NUM_EXAMPLES = _count("num-examples", "num_examples", low=1)
LOSS = _amount("loss", "loss")
STEPS = _count("steps", "steps")
EXAMPLES_SEEN = _count("examples-seen", "examples_seen")
FLOPS = _amount("flops", "flops")
WITHHOLDABLE = (NUM_EXAMPLES, LOSS, EXAMPLES_SEEN, FLOPS)

# Optional groups, all-or-nothing: the ledger code that reads one of a group's fields may
# rely on the others being there.
EXTRA_GROUPS: dict[str, tuple[Scalar, ...]] = {
    "split": (
        _count("smashed-bytes-up", "smashed_bytes_up"),
        _count("smashed-bytes-down", "smashed_bytes_down"),
        _amount("server-flops", "server_flops"),
        _count("split-steps", "split_steps"),
        _count("local-loss-steps", "local_loss_steps"),
        _count("split-examples", "split_examples"),
        _count("local-loss-examples", "local_loss_examples"),
        _amount("client-flops-per-example", "client_flops_per_example"),
        # At least one FLOP: the denominator of the round's client_flops_fraction.
        _amount("full-model-flops-per-example", "full_model_flops_per_example", low=1.0),
        # The FLOP probe's bytes (synthetic text, fedtune.split.flops): traffic too.
        _count("probe-bytes", "probe_bytes"),
    ),
    "pruning": (
        _count("examples-available", "examples_available"),
        _count("examples-kept", "examples_kept"),
        Scalar("rescored", "rescored", int, 0, 1),
        _amount("scoring-flops", "scoring_flops"),
        # Savings are expected values net of scoring: negative when scoring cost more.
        _amount("flops-saved", "flops_saved", low=-MAX_FLOAT),
    ),
    "pruning_split": (
        _amount("server-flops-saved", "server_flops_saved", low=-MAX_FLOAT),
        _count("scoring-smashed-bytes", "scoring_smashed_bytes"),
        _amount("smashed-bytes-saved", "smashed_bytes_saved", low=-MAX_FLOAT),
    ),
    "importance": (_amount("importance-weight", "importance_weight"),),
}
# A group that only makes sense together with others.
GROUP_NEEDS = {"pruning_split": ("pruning", "split")}
EXTRAS = {s.key: s for group in EXTRA_GROUPS.values() for s in group}

# The client's own account of its DP-SGD spend: kept for the record (bounded in size),
# never accounted: the server charges from its own plan (`strategies.privacy_ledger`).
DP_SIGMA = Scalar("noise-multiplier", "noise_multiplier", float, 0.0, MAX_NOISE, True)
DP_RATE = Scalar("sample-rate", "sample_rate", float, 0.0, 1.0, True)
DP_STEPS = _count("dp-steps", "steps")
DP_EPSILON = _amount("epsilon", "epsilon")
DP_HISTORY = {"sigma": Series("dp-history-sigma", DP_SIGMA),
              "q": Series("dp-history-q", DP_RATE),
              "steps": Series("dp-history-steps", _count("dp-history-steps", "steps", low=1))}
DP_KEYS = (DP_SIGMA.key, DP_RATE.key, DP_STEPS.key, DP_EPSILON.key,
           *(s.key for s in DP_HISTORY.values()))


def _history(values: Mapping[str, list]) -> DPHistory:
    lengths = {len(v) for v in values.values()}
    if len(lengths) > 1:
        raise ProtocolError("dp-history-sigma, dp-history-q and dp-history-steps differ in "
                            f"length ({', '.join(str(len(v)) for v in values.values())})")
    return DPHistory.from_lists(dict(values))


# -- discovery -------------------------------------------------------------------------------

_ROSTER = "roster"
_PARTITION = "partition-id"
_OWN_EXAMPLES = "own-examples"
_CONFIG = "config"


@dataclass(frozen=True)
class PartitionQuery:
    """Server -> client: which partition do you hold? (Node ids are random per run.)"""

    def to_record(self) -> RecordDict:
        return RecordDict({_CONFIG: ConfigRecord({})})


@dataclass(frozen=True)
class PartitionReply:
    """Client -> server: the partition this node holds, and, for a node that trains on its
    own data file (node config `data-path`), that file's example count. The server takes
    the count once, at discovery: it weights the node and plans its DP charges by it for
    the whole run, and refuses a later reply that reports another count. A node training on
    its corpus partition sends no count (the server knows the partition's size)."""

    partition_id: int
    own_examples: int | None = None

    def to_record(self) -> RecordDict:
        record: dict[str, int] = {_PARTITION: self.partition_id}
        if self.own_examples is not None:
            record[_OWN_EXAMPLES] = self.own_examples
        return RecordDict({_ROSTER: MetricRecord(record)})

    @classmethod
    def from_record(cls, content: RecordDict, num_partitions: int) -> PartitionReply:
        _only(content, metrics={_ROSTER})
        record = content.metric_records[_ROSTER]
        _no_extra_keys(record, {_PARTITION, _OWN_EXAMPLES}, _ROSTER)
        if _PARTITION not in record:
            raise ProtocolError(f"{_ROSTER} carries no {_PARTITION}")
        pid = Scalar(_PARTITION, "partition_id", int, 0, num_partitions - 1).check(
            record[_PARTITION])
        own = None
        if _OWN_EXAMPLES in record:
            own = int(Scalar(_OWN_EXAMPLES, "own_examples", int, 1, MAX_NODE_EXAMPLES).check(
                record[_OWN_EXAMPLES]))
        return cls(int(pid), own)


# -- training --------------------------------------------------------------------------------

_GLOBAL = "global"
_VECTOR = "vector"
_DELTA = "delta"
_METRICS = "metrics"
_INFO = "info"
_SPEC_HASH = "spec-hash"
_EXAMPLES = "examples"


@dataclass(frozen=True)
class PruneSettings:
    """`el2n_pruning`: train on the `keep` highest-EL2N fraction, rescore every `every`."""

    keep: float
    every: int

    def kept(self, n: int) -> int:
        """Examples a client of `n` trains on once pruned (the server charges by it too)."""
        return max(1, math.ceil(self.keep * n))


@dataclass(frozen=True)
class DomainSettings:
    """`population_expansion` importance weighting: this client's domain and weight cap."""

    is_target: bool
    max_weight: float


@dataclass(frozen=True)
class TrainInstruction:
    """Server -> client: train on the global vector for one round."""

    vector: np.ndarray
    server_round: int
    lr: float
    spec_hash: str
    # User-level DP with client-side clipping: clip the delta to this L2 norm.
    clip_norm: float | None = None
    # The DP-SGD spend the server holds for this client (a restarted client resumes from it).
    dp_history: DPHistory | None = None
    prune: PruneSettings | None = None
    domain: DomainSettings | None = None
    # Reply with only what the server needs under user-level DP (`WITHHOLDABLE` stay home).
    withhold_metrics: bool = False
    # The examples the server holds for this client (its partition's size, or the count a
    # node with its own data file reported at discovery): the server charges its DP spend
    # by this count, so the client trains on exactly this many or refuses the round.
    examples: int | None = None

    def to_record(self, wire: Array | None = None) -> RecordDict:
        """The message content; `wire` is the vector already encoded (shared by a cohort)."""
        config: dict[str, Any] = {"server-round": self.server_round, "lr": float(self.lr),
                                  _SPEC_HASH: self.spec_hash,
                                  "withhold-metrics": self.withhold_metrics}
        if self.clip_norm is not None:
            config["clip-norm"] = float(self.clip_norm)
        if self.examples is not None:
            config[_EXAMPLES] = int(self.examples)
        if self.dp_history is not None and self.dp_history.entries:
            config.update({s.key: values for s, values in zip(
                DP_HISTORY.values(), self.dp_history.to_lists().values(), strict=True)})
        if self.prune is not None:
            config.update({"prune-keep": float(self.prune.keep),
                           "prune-every": int(self.prune.every)})
        if self.domain is not None:
            config.update({"domain-target": bool(self.domain.is_target),
                           "importance-max": float(self.domain.max_weight)})
        vector = wire if wire is not None else encode(self.vector)
        return RecordDict({_GLOBAL: ArrayRecord({_VECTOR: vector}),
                           _CONFIG: ConfigRecord(config)})

    @classmethod
    def from_record(cls, content: RecordDict, spec: DeltaSpec) -> TrainInstruction:
        config = content[_CONFIG]
        if config.get(_SPEC_HASH) != spec.hash:
            raise ProtocolError(
                f"server spec {config.get(_SPEC_HASH)} != client spec {spec.hash}: the client "
                "runs another backbone, method or config than the server")
        history = None
        if DP_HISTORY["steps"].key in config:
            history = _history({k: s.check(list(config[s.key])) for k, s in DP_HISTORY.items()})
        prune = None
        if "prune-keep" in config:
            prune = PruneSettings(float(config["prune-keep"]), int(config["prune-every"]))
        domain = None
        if "domain-target" in config:
            domain = DomainSettings(bool(config["domain-target"]),
                                    float(config["importance-max"]))
        clip = config.get("clip-norm")
        examples = config.get(_EXAMPLES)
        return cls(vector=decode(content[_GLOBAL][_VECTOR], spec),
                   server_round=int(config["server-round"]), lr=float(config["lr"]),
                   spec_hash=str(config[_SPEC_HASH]),
                   clip_norm=None if clip is None else float(clip), dp_history=history,
                   prune=prune, domain=domain,
                   withhold_metrics=bool(config["withhold-metrics"]),
                   examples=None if examples is None else int(examples))


@dataclass(frozen=True)
class ReportedDP:
    """A client's own account of its DP-SGD spend. The server computes spend itself and
    never runs an accountant on this; it is kept in the ledger as `reported_dp`, under that
    name only (at most `MAX_HISTORY` entries of finite, range-checked numbers)."""

    noise_multiplier: float
    sample_rate: float
    steps: int  # this round's DP steps
    epsilon: float | None
    history: DPHistory

    def to_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {DP_SIGMA.key: self.noise_multiplier,
                               DP_RATE.key: self.sample_rate, DP_STEPS.key: self.steps}
        if self.epsilon is not None:
            out[DP_EPSILON.key] = self.epsilon
        lists = self.history.to_lists()
        out.update({s.key: lists[k] for k, s in DP_HISTORY.items()})
        return out

    def ledger(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps, "epsilon": self.epsilon,
                "history": self.history.to_lists()}


@dataclass(frozen=True)
class TrainReport:
    """What a client reports about its round (besides its DP spend). The fields in
    `WITHHOLDABLE` are None when the server asked the client to withhold them."""

    steps: int
    num_examples: int | None = None
    loss: float | None = None
    examples_seen: int | None = None
    flops: float | None = None
    # Optional groups (`EXTRA_GROUPS`) by wire key: split, pruning, importance figures.
    extras: Mapping[str, int | float] = field(default_factory=dict)

    def ledger(self) -> dict[str, Any]:
        """The reported figures under their ledger names (none of them server-owned)."""
        out: dict[str, Any] = {"steps": self.steps}
        for rule in WITHHOLDABLE:
            value = getattr(self, rule.name)
            if value is not None:
                out[rule.name] = value
        out.update({EXTRAS[k].name: v for k, v in self.extras.items()})
        return out

    def groups(self) -> frozenset[str]:
        """The optional figure groups this report carries (`EXTRA_GROUPS` names)."""
        return frozenset(name for name, group in EXTRA_GROUPS.items()
                         if group[0].key in self.extras)

    def _group(self, name: str) -> object | None:
        """The reported figures of group `name` as its type, None when not reported (a
        group is all or nothing: `_report` checked that)."""
        group = EXTRA_GROUPS[name]
        if group[0].key not in self.extras:
            return None
        return FIGURE_TYPES[name](**{s.name: self.extras[s.key] for s in group})

    @property
    def split(self) -> SplitFigures | None:
        return self._group("split")  # type: ignore[return-value]

    @property
    def pruning(self) -> PruningFigures | None:
        return self._group("pruning")  # type: ignore[return-value]

    @property
    def pruning_split(self) -> PruningSplitFigures | None:
        return self._group("pruning_split")  # type: ignore[return-value]

    @property
    def importance(self) -> ImportanceFigures | None:
        return self._group("importance")  # type: ignore[return-value]


@dataclass(frozen=True)
class TrainReply:
    """Client -> server: the delta (still encoded) and the round's report."""

    delta: Array
    spec_hash: str
    report: TrainReport
    dp: ReportedDP | None = None

    @classmethod
    def build(cls, delta: np.ndarray, spec_hash: str, report: TrainReport,
              dp: ReportedDP | None = None, encoding: str = "float32",
              spec: DeltaSpec | None = None) -> TrainReply:
        return cls(encode(delta, encoding, spec), spec_hash, report, dp)

    def to_record(self) -> RecordDict:
        metrics: dict[str, Any] = {STEPS.key: self.report.steps}
        for rule in WITHHOLDABLE:
            value = getattr(self.report, rule.name)
            if value is not None:
                metrics[rule.key] = value
        metrics.update(self.report.extras)
        if self.dp is not None:
            metrics.update(self.dp.to_metrics())
        return RecordDict({_DELTA: ArrayRecord({_VECTOR: self.delta}),
                           _METRICS: MetricRecord(metrics),
                           _INFO: ConfigRecord({_SPEC_HASH: self.spec_hash})})

    @classmethod
    def from_record(cls, content: RecordDict, withheld: bool = False) -> TrainReply:
        """Check a reply's structure and every reported field; `withheld`: the server asked
        for `WITHHOLDABLE` and the extras to stay on the client, so they must be absent."""
        _only(content, arrays={_DELTA}, metrics={_METRICS}, configs={_INFO})
        arrays = content.array_records[_DELTA]
        if list(arrays) != [_VECTOR]:
            raise ProtocolError(f"reply's {_DELTA!r} record must hold exactly one array "
                                f"{_VECTOR!r}, got {_names(arrays)} (arrays besides the "
                                "delta vector)")
        info = content.config_records[_INFO]
        _no_extra_keys(info, {_SPEC_HASH}, _INFO)
        spec_hash = info.get(_SPEC_HASH)
        if not isinstance(spec_hash, str) or len(spec_hash) > 64:
            raise ProtocolError(f"spec hash must be a string of at most 64 characters, got "
                                f"{_show(spec_hash)}")
        metrics = dict(content.metric_records[_METRICS].items())
        report, dp = _report(metrics, withheld)
        return cls(arrays[_VECTOR], spec_hash, report, dp)

    def decoded_delta(self, spec: DeltaSpec) -> np.ndarray:
        """The delta as a float32 vector of `spec`; raises ProtocolError (spec hash) or
        DeltaError (length, dtype, non-finite)."""
        if self.spec_hash != spec.hash:
            raise ProtocolError(f"spec hash {self.spec_hash!r} does not match the server's "
                                f"{spec.hash}")
        return decode(self.delta, spec)


def _report(metrics: dict[str, Any], withheld: bool) -> tuple[TrainReport, ReportedDP | None]:
    allowed = {STEPS.key, *DP_KEYS}
    if not withheld:
        allowed |= {r.key for r in WITHHOLDABLE} | set(EXTRAS)
    unknown = sorted(set(metrics) - allowed)
    if unknown:
        why = " (withheld under privacy.user.withhold_metrics)" if withheld else ""
        raise ProtocolError(f"reply metrics hold keys the protocol does not allow{why}: "
                            f"{_names(unknown)}")
    required = [STEPS] + ([] if withheld else [NUM_EXAMPLES, LOSS, EXAMPLES_SEEN, FLOPS])
    for rule in required:
        if rule.key not in metrics:
            raise ProtocolError(f"reply metrics carry no {rule.key!r}")
    values = {rule.name: rule.check(metrics[rule.key]) for rule in required}
    present = {name for name, group in EXTRA_GROUPS.items()
               if any(s.key in metrics for s in group)}
    extras: dict[str, int | float] = {}
    for name in sorted(present):
        group = EXTRA_GROUPS[name]
        missing = [s.key for s in group if s.key not in metrics]
        if missing:
            raise ProtocolError(f"reply metrics report part of the {name} figures; missing "
                                f"{missing[:5]}")
        needs = [g for g in GROUP_NEEDS.get(name, ()) if g not in present]
        if needs:
            raise ProtocolError(f"reply metrics report {name} figures without {needs}")
        extras.update({s.key: s.check(metrics[s.key]) for s in group})
    scoring = extras.get("scoring-flops")
    if scoring is not None and values.get("flops") is not None and scoring > values["flops"]:
        raise ProtocolError(f"reply reports scoring-flops {scoring:.6g} above its flops "
                            f"{values['flops']:.6g} (scoring is part of the round's FLOPs)")
    report = TrainReport(extras=extras, **values)
    return report, _reported_dp(metrics)


def _reported_dp(metrics: dict[str, Any]) -> ReportedDP | None:
    keys = [k for k in DP_KEYS if k != DP_EPSILON.key]
    given = [k for k in keys if k in metrics]
    if not given and DP_EPSILON.key not in metrics:
        return None
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise ProtocolError(f"reply metrics report part of the DP spend; missing {missing}")
    epsilon = metrics.get(DP_EPSILON.key)
    return ReportedDP(
        noise_multiplier=DP_SIGMA.check(metrics[DP_SIGMA.key]),
        sample_rate=DP_RATE.check(metrics[DP_RATE.key]),
        steps=int(DP_STEPS.check(metrics[DP_STEPS.key])),
        epsilon=None if epsilon is None else DP_EPSILON.check(epsilon),
        history=_history({k: s.check(metrics[s.key]) for k, s in DP_HISTORY.items()}))


def _only(content: RecordDict, arrays: set[str] = frozenset(), metrics: set[str] = frozenset(),
          configs: set[str] = frozenset()) -> None:
    """`content` holds exactly these records, each of its expected type."""
    expected = {**{k: "array" for k in arrays}, **{k: "metric" for k in metrics},
                **{k: "config" for k in configs}}
    got = {**{k: "array" for k in content.array_records},
           **{k: "metric" for k in content.metric_records},
           **{k: "config" for k in content.config_records}}
    if got != expected:
        extra = sorted(set(got) - set(expected))
        if extra and all(got[k] == "array" for k in extra):
            raise ProtocolError(f"reply carries arrays besides the delta vector: "
                                f"{_names(extra)}")
        raise ProtocolError(f"message records {_describe(got)} are not the expected "
                            f"{_describe(expected)}")


def _describe(records: Mapping[str, str]) -> str:
    items = sorted(records.items())
    text = ", ".join(f"{_names([k])[0]!r}:{kind}" for k, kind in items[:6])
    return "{" + text + (", ..." if len(items) > 6 else "") + "}"


def _no_extra_keys(record: Mapping[str, object], allowed: set[str], where: str) -> None:
    extra = sorted(set(record) - allowed)
    if extra:
        raise ProtocolError(f"{where} holds keys the protocol does not allow: "
                            f"{_names(extra)}")


# The instruction fields a strategy plugin may set (`Plugin.client_config`).
PLUGIN_FIELDS = ("prune", "domain")


def check_plugin_fields(fields: Mapping[str, object]) -> None:
    """Refuse instruction fields a plugin may not set: the rest belong to the server core."""
    unknown = sorted(set(fields) - set(PLUGIN_FIELDS))
    if unknown:
        raise ValueError(f"plugin instruction fields {unknown} are not among "
                         f"{list(PLUGIN_FIELDS)}")
