"""The direction check against the server's own validation descent direction
(`aggregation.norm_bound_direction = "validation"`, fedtune.task.reference and
strategies.robust): the reference is the negative validation gradient, a reversed row is
dropped against it where the others' median keeps it, the check runs before the median
too, the setting is refused without validation rows, the figures stay bounded, the other
modes are unchanged, and the reference is a function of the global vector alone (nothing a
checkpoint must carry)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from aggregation_round import SPEC, one_round
from config_refusals import refusal
from torch import nn

from fedtune.config import AggregationConfig, ConfigError, load_config
from fedtune.task.reference import NoValidationError, reference_rows, validation_direction
from fedtune.task.rows import Split
from fedtune.tuning.base import TunedModel
from fedtune.wire.delta import DeltaSpec
from strategies import DeltaFedAvg, robust
from strategies.server import _reference

pytestmark = pytest.mark.usefixtures("task_identity")

VOCAB, WIDTH, LABELS = 11, 3, 2


class TinyClassifier(TunedModel):
    """A frozen embedding, mean-pooled, then a trainable linear head; the bias is trained
    at twice the base rate (its own parameter group), as a method with its own lr scale."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Embedding(VOCAB, WIDTH)
        self.backbone.weight.requires_grad_(False)
        self.weight = nn.Parameter(torch.randn(LABELS, WIDTH))
        self.bias = nn.Parameter(torch.randn(LABELS))

    def pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(torch.float32).unsqueeze(-1)
        return (self.backbone(ids) * weights).sum(1) / weights.sum(1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.pooled(ids, mask) @ self.weight.T + self.bias

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.weight], "lr": lr}, {"params": [self.bias], "lr": 2 * lr}]


def _task(rows: int = 10, seed: int = 0, validation: bool = True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(rows, 5))
    mask = np.ones_like(ids)
    mask[:, 4] = rng.integers(0, 2, size=rows)  # some rows one token shorter
    model = TinyClassifier()
    spec = DeltaSpec.from_state(model.trainable_state(), "tiny", {"m": 1})
    split = Split(ids, mask, rng.integers(0, LABELS, size=rows)) if validation else None
    return SimpleNamespace(validation=split, spec=spec), model


def _cfg(rows: int = 64, batch: int = 128):
    return SimpleNamespace(task=SimpleNamespace(kind="classification"),
                           aggregation=SimpleNamespace(direction_reference_rows=rows),
                           train=SimpleNamespace(eval_batch_size=batch))


def _by_hand(task, model, vector, rows):
    """The mean cross entropy's gradient over the first `rows` rows, written out: for a
    linear softmax head, dL/dW = (p - y)^T x / n and dL/db = mean(p - y); negated, the bias
    part doubled (its group's rate)."""
    split = task.validation
    state = task.spec.unflatten(vector)
    w, b = state["weight"].double().numpy(), state["bias"].double().numpy()
    ids = torch.from_numpy(split.input_ids[:rows])
    mask = torch.from_numpy(split.attention_mask[:rows])
    with torch.no_grad():
        x = model.pooled(ids, mask).double().numpy()
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    err = p - np.eye(LABELS)[split.labels[:rows]]
    grad_w, grad_b = err.T @ x / rows, err.mean(0)
    return np.concatenate([-grad_w.ravel(), -2 * grad_b])


@pytest.mark.parametrize("rows,batch", [(10, 128), (7, 3), (64, 4)])
def test_the_reference_is_the_negative_validation_gradient(rows, batch):
    task, model = _task(rows=10)
    vector = np.random.default_rng(1).normal(size=task.spec.size).astype(np.float32)
    got = validation_direction(task, model, vector, _cfg(rows, batch))
    np.testing.assert_allclose(got, _by_hand(task, model, vector, min(rows, 10)),
                               rtol=1e-5, atol=1e-6)
    # It leaves the model holding the vector and no gradients, in the mode it found it.
    assert all(p.grad is None for p in model.trainable_state().values())
    np.testing.assert_array_equal(task.spec.flatten(model.trainable_state()), vector)
    assert model.training


def test_a_step_along_the_reference_lowers_the_validation_loss():
    task, model = _task(rows=10)
    vector = task.spec.flatten(model.trainable_state())
    ref = validation_direction(task, model, vector, _cfg())
    ids, mask, labels = task.validation.tensors().tensors

    def loss(v):
        model.load_trainable(task.spec.unflatten(v.astype(np.float32)))
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(ids, mask), labels))

    assert loss(vector + 1e-2 * ref) < loss(vector) < loss(vector - 1e-2 * ref)


def test_the_reference_depends_on_the_global_vector_alone():
    """Nothing carried between rounds: a resumed run (a fresh model, the checkpoint's
    vector) gets the reference a run that never stopped gets."""
    task, model = _task()
    vector = np.random.default_rng(2).normal(size=task.spec.size).astype(np.float32)
    first = validation_direction(task, model, vector, _cfg())
    validation_direction(task, model, np.zeros_like(vector), _cfg())  # another round between
    _, fresh = _task()
    np.testing.assert_array_equal(validation_direction(task, fresh, vector, _cfg()), first)
    np.testing.assert_array_equal(validation_direction(task, model, vector, _cfg()), first)


def _near_orthogonal(n=5, d=400, seed=0, shared=0.15):
    """Non-IID honest rows as the no-DP runs show them: a small shared step (the validation
    direction) plus a large client-specific part, near-orthogonal to each other."""
    rng = np.random.default_rng(seed)
    step = rng.normal(size=d)
    step /= np.linalg.norm(step)
    rows = np.stack([shared * step + rng.normal(size=d) / np.sqrt(d) for _ in range(n)])
    return rows, step


def _checked(deltas, reference=None, **settings):
    cfg = AggregationConfig(**{"norm_bound": "adaptive", "norm_bound_direction": "validation",
                               **settings})
    cfg.validate()
    return robust.aggregate(deltas, np.ones(len(deltas)), cfg, reference=reference)


def test_a_reversed_row_at_an_honest_norm_is_dropped_against_the_validation_reference():
    honest, step = _near_orthogonal()
    deltas = honest.copy()
    deltas[0] = -10 * honest[0]  # flip: clipped to an honest norm by the bound
    out = _checked(deltas, reference=step)
    checked = out.figures["norm_bound"]["direction"]
    assert checked["reference"] == robust.VALIDATION_REFERENCE
    assert checked["dropped"] == [0]
    cosines = dict(checked["cosines"])
    assert cosines[0] < 0 < min(cosines[i] for i in range(1, 5))
    bound = out.figures["norm_bound"]["bound"]
    kept = robust.clip_rows(deltas, bound)[0][1:]
    np.testing.assert_allclose(out.delta, kept.mean(0))


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_honest_near_orthogonal_rows_are_all_kept(seed):
    """The no-DP honest runs' cost of the others'-median check (an honest row dropped most
    rounds): near-orthogonal honest rows score about 0 against each other's median, and
    one falls below it; against the shared step each scores its own share of it."""
    honest, step = _near_orthogonal(seed=seed, shared=0.1)
    out = _checked(honest, reference=step)
    assert out.figures["norm_bound"]["direction"]["dropped"] == []
    assert min(c for _, c in out.figures["norm_bound"]["direction"]["cosines"]) > 0
    median_check = _checked(honest, norm_bound_direction="median")
    assert len(median_check.figures["norm_bound"]["direction"]["dropped"]) == 1


def test_a_boosted_row_is_kept_but_bounded():
    honest, step = _near_orthogonal(seed=4)
    deltas = honest.copy()
    deltas[0] = 100 * honest[0]
    out = _checked(deltas, reference=step)
    assert out.figures["norm_bound"]["direction"]["dropped"] == []
    assert 0 in out.figures["norm_bound"]["clipped"]
    assert np.linalg.norm(out.delta) <= out.figures["norm_bound"]["bound"] * (1 + 1e-12)


def test_the_check_runs_before_the_median_without_a_bound():
    honest, step = _near_orthogonal(seed=5)
    deltas = honest.copy()
    deltas[0] = -10 * honest[0]
    out = _checked(deltas, reference=step, rule="median", norm_bound="off")
    assert "norm_bound" not in out.figures
    assert out.figures["direction"]["dropped"] == [0]
    assert out.figures["direction"]["reference"] == robust.VALIDATION_REFERENCE
    np.testing.assert_array_equal(out.delta, np.median(honest[1:], axis=0))
    # The plain median keeps the reversed row as each coordinate's extreme.
    plain = robust.aggregate(deltas, np.ones(5), AggregationConfig(rule="median"))
    assert not np.array_equal(plain.delta, out.delta)


def test_the_median_after_the_check_needs_an_honest_majority_of_the_rows_left():
    """The check may drop f honest rows and keep f attackers that point the validation way:
    the median of the n - f rows left needs n >= 3f + 1."""
    cfg = AggregationConfig(rule="median", norm_bound_direction="validation")
    cfg.validate()
    assert cfg.shortfall(4, "deltas") is None
    assert "3 x tolerate + 1 = 4" in cfg.shortfall(3, "deltas")
    out = robust.aggregate(np.eye(3), np.ones(3), cfg, reference=np.ones(3))
    assert out.delta is None and "got 3" in out.figures["refused"]


def test_a_zero_reference_drops_nothing():
    honest, _ = _near_orthogonal(seed=6)
    deltas = honest.copy()
    deltas[0] = -deltas[0]
    out = _checked(deltas, reference=np.zeros(honest.shape[1]))
    checked = out.figures["norm_bound"]["direction"]
    assert checked["dropped"] == [] and checked["no_reference"] == [0, 1, 2, 3, 4]


def test_at_most_tolerate_rows_are_dropped_the_lowest_first():
    honest, step = _near_orthogonal(n=6, seed=7)
    deltas = honest.copy()
    deltas[2], deltas[4] = -honest[2], -3 * honest[4]
    out = _checked(deltas, reference=step)
    checked = out.figures["norm_bound"]["direction"]
    cosines = dict(checked["cosines"])
    assert checked["dropped"] == [min((2, 4), key=cosines.get)]


def test_the_figures_are_bounded_by_the_cohort_not_the_model():
    def size(d):
        honest, step = _near_orthogonal(d=d, seed=8)
        return len(json.dumps(_checked(honest, reference=step).figures))

    assert abs(size(100) - size(100_000)) < 40  # only the rounded cosines' digits differ


def test_the_reference_is_required_and_checked():
    honest, step = _near_orthogonal()
    with pytest.raises(ValueError, match="needs the server's reference direction"):
        _checked(honest)
    with pytest.raises(ValueError, match="shape"):
        _checked(honest, reference=step[:-1])


@pytest.mark.parametrize("settings", [
    {}, {"rule": "median"}, {"rule": "median", "direction_weighting": "zero"},
    {"direction_weighting": "cosine"}])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_reference_is_no_direction_and_the_round_goes_on(settings, bad):
    """The server's gradient at a global vector the clients moved (a diverged model, an
    embedding past float32's square) can overflow: that round has no direction, as a zero
    reference (every row kept, each under the bound and the rule), and says so; it never
    ends the run with a ValueError."""
    honest, step = _near_orthogonal(seed=6)
    deltas = honest.copy()
    deltas[0] = -deltas[0]
    reference = step.copy()
    reference[3] = bad
    out = _checked(deltas, reference=reference, **settings)
    zero = _checked(deltas, reference=np.zeros_like(step), **settings)
    np.testing.assert_array_equal(out.delta, zero.delta)
    checked = out.figures["norm_bound"]["direction"]
    assert checked["no_reference"] == [0, 1, 2, 3, 4] and checked["reference_finite"] is False
    assert "reference_finite" not in zero.figures["norm_bound"]["direction"]


@pytest.mark.parametrize("settings", [
    {}, {"norm_bound": "adaptive"}, {"rule": "median"},
    {"norm_bound": "adaptive", "norm_bound_direction": "median"},
    {"norm_bound": "adaptive", "norm_bound_center": "median"},
    {"norm_bound": 0.5, "norm_bound_direction": "median", "norm_bound_center": "median"},
])
def test_other_modes_ignore_a_reference_and_are_unchanged(settings):
    """A reference given to a configuration that does not use it changes nothing, and
    their figures keep their shape (the direction figures under the bound's)."""
    deltas = np.random.default_rng(9).normal(size=(5, 30))
    cfg = AggregationConfig(**settings)
    cfg.validate()
    plain = robust.aggregate(deltas, np.ones(5), cfg)
    given = robust.aggregate(deltas, np.ones(5), cfg, reference=np.ones(30))
    np.testing.assert_array_equal(plain.delta, given.delta)
    assert plain.figures == given.figures and "direction" not in plain.figures
    if settings.get("norm_bound_direction") == "median":
        assert plain.figures["norm_bound"]["direction"]["reference"] == "median of the others"


def test_delta_fedavg_asks_the_reference_at_the_vector_it_sent():
    asked = []

    def reference(vector):
        asked.append(vector.copy())
        return np.array([1.0, 1, 1, 1, 1, 1])

    cfg = AggregationConfig(norm_bound="adaptive", norm_bound_direction="validation")
    deltas = np.ones((5, 6))
    deltas[0] = -1.0  # the reversed row
    start, result = one_round(cfg, deltas, reference)
    assert len(asked) == 1
    np.testing.assert_array_equal(asked[0], start)
    np.testing.assert_array_equal(result.vector, start + 1)
    assert result.outcome.aggregation["norm_bound"]["direction"]["dropped"] == [0]
    with pytest.raises(ValueError, match="needs the server's reference direction"):
        DeltaFedAvg(SPEC, 5, seed=0, aggregation=cfg)


def test_the_server_refuses_the_reference_without_validation_rows():
    task, model = _task(validation=False)
    cfg = SimpleNamespace(aggregation=SimpleNamespace(norm_bound_direction="validation",
                                                      direction_reference_rows=64))
    with pytest.raises(ConfigError) as err:
        _reference(task, model, cfg)
    assert "data.validation_fraction > 0" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(NoValidationError):
        reference_rows(task, 64)
    task, _ = _task(rows=10)
    assert reference_rows(task, 64) == 10 and reference_rows(task, 3) == 3
    off = SimpleNamespace(aggregation=SimpleNamespace(norm_bound_direction="median"))
    assert _reference(task, model, off) is None


def test_the_validation_setting_loads():
    cfg = load_config(None, ["aggregation.norm_bound=adaptive",
                             "aggregation.norm_bound_direction=validation",
                             "aggregation.direction_reference_rows=32"])
    assert cfg.aggregation.direction_reference_rows == 32
    assert not cfg.aggregation.default
    # The server's privacy setting does not change it (it is not "auto").
    for sample_dp in (True, False):
        assert cfg.aggregation.for_sample_dp(sample_dp).norm_bound_direction == "validation"
    cfg = load_config(None, ["aggregation.rule=median",
                             "aggregation.norm_bound_direction=validation"])
    assert cfg.aggregation.norm_bound == "off"


@pytest.mark.parametrize("sets,needle", [
    (["data.validation_fraction=0", "aggregation.norm_bound=adaptive",
      "aggregation.norm_bound_direction=validation"],
     "aggregation.norm_bound_direction='validation' needs the server's validation split: "
     "set data.validation_fraction > 0"),
    (["aggregation.norm_bound_direction=validation"],
     "aggregation.norm_bound_direction='validation' with aggregation.rule='mean' needs a "
     "norm bound"),
    (["aggregation.rule=krum", "aggregation.norm_bound_direction=validation"],
     "needs aggregation.rule in mean, median, got 'krum'"),
    (["aggregation.rule=median", "aggregation.norm_bound_direction=validation",
      "aggregation.tolerate=0"],
     "aggregation.norm_bound_direction='validation' drops at most aggregation.tolerate rows"),
    (["aggregation.rule=median", "aggregation.norm_bound_direction=validation",
      "aggregation.tolerate=2"],
     "only with train.clients_per_round >= 3 x tolerate + 1 = 7"),
    (["aggregation.norm_bound=1", "aggregation.norm_bound_direction=validation",
      "aggregation.direction_reference_rows=0"],
     "aggregation.direction_reference_rows must be an integer in [1, 4096], got 0"),
    (["aggregation.direction_reference_rows=5000"],
     "aggregation.direction_reference_rows must be an integer in [1, 4096], got 5000"),
    # Under user-level DP the robust rules do not apply, the check included.
    (["privacy.user.enabled=true", "aggregation.rule=median",
      "aggregation.norm_bound_direction=validation"],
     "must stay 'mean' and 'off' with privacy.user.enabled=true"),
])
def test_validation_direction_refusals_are_one_line(sets, needle):
    assert needle in refusal(sets)


def test_user_level_dp_refuses_any_direction_check():
    """`AggregationConfig.default` counts the check: a mean without a bound but with a
    check is not FedAvg (the config refuses that combination anyway; the property must
    not be the only guard)."""
    assert not AggregationConfig(norm_bound_direction="validation").default
    assert AggregationConfig().default


@pytest.mark.slow
def test_a_real_round_loop_checks_every_round_against_the_validation_direction(
        tmp_path, monkeypatch):
    """Wiring, one tiny in-process run (the real round loop and ClientApp handlers): the
    server computes its reference each round, the check runs before the median, the round
    records say so."""
    from inline_grid import TINY, inline_run

    sets = [*TINY, "data.num_clients=4", "train.clients_per_round=4", "train.rounds=2",
            "privacy.sample.enabled=false", "aggregation.rule=median",
            "aggregation.norm_bound_direction=validation",
            "aggregation.direction_reference_rows=8",
            "faults.attack_simulation.kind=flip", "faults.attack_simulation.partitions=[0]"]
    cfg = load_config(None, sets)
    out = tmp_path / "run"
    summary, _, _ = inline_run(cfg, out, monkeypatch)
    assert summary["rounds"] == 2
    for line in (out / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        checked = record["aggregation"]["direction"]
        assert checked["reference"] == robust.VALIDATION_REFERENCE
        assert [pid for pid, _ in checked["cosines"]] == [0, 1, 2, 3]
        cosines = dict(checked["cosines"])
        below = [pid for pid, c in cosines.items() if c < 0]
        # At most one row (tolerate), the lowest, and only one below the threshold.
        assert checked["dropped"] == ([min(below, key=cosines.get)] if below else [])
        assert record["aggregation"]["deltas"] == 4 and "norm_bound" not in record["aggregation"]
