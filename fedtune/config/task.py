"""`[task]`: what the run learns. A registry of task kinds, each with the config rules it adds
(what it cannot run yet is refused here, with one line, before Ray or a model starts):

- `classification` (the default): a head on the frozen encoder's pooled states, labels per row;
- `causal_lm`: next-token training of a frozen decoder with its LM head; rows are texts
  without labels (SpamAssassin: the ham messages), a client is a user (`data.by`).

The torch side of each kind (rows, labels, loss, evaluation, ledger fields) is
`fedtune.task.kinds`, registered under the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedtune.config.errors import ConfigError

DEFAULT_KIND = "classification"


@dataclass
class TaskConfig:
    """`[task]`. `kind` names a registered task kind."""

    kind: str = DEFAULT_KIND
    # causal_lm: keep rows whose user column (`data.by`) is empty (SpamAssassin: personal
    # mail outside any mailing list; `data.partition = "natural"` then gives them one
    # client per collection). Default: only rows that name their user train.
    keep_unattributed: bool = False
    # causal_lm: the final model's generation quality (fedtune.task.generation): on the first
    # `generation_examples` test texts at least prompt + new tokens long (0: not measured),
    # greedy continuation of the first `generation_prompt_tokens` tokens for
    # `generation_new_tokens`, ROUGE-L F1 against the text's own next tokens. A classifier
    # ignores them.
    generation_examples: int = 32
    generation_prompt_tokens: int = 64
    generation_new_tokens: int = 16

    def validate(self) -> None:
        task_kind_spec(self.kind)  # the numbers' ranges: fedtune.config.checks.BOUNDS
        if self.keep_unattributed and not task_kind_spec(self.kind).unlabelled:
            raise ConfigError(f"task.keep_unattributed=true applies to unlabelled task kinds "
                              f"({', '.join(k for k in task_kinds() if _KINDS[k].unlabelled)}),"
                              f" not task.kind={self.kind!r}")


@dataclass(frozen=True)
class TaskKindSpec:
    """What the config needs to know about a task kind."""

    name: str
    # Tuning methods built for this kind (None: every registered method).
    methods: tuple[str, ...] | None
    # Rows carry no label (the texts are the targets): data.labels and label-driven
    # settings do not apply.
    unlabelled: bool
    # Cross-section rules of this kind: raise ConfigError naming the key.
    check: Callable[[Any], None]


_KINDS: dict[str, TaskKindSpec] = {}


def register_task_kind(spec: TaskKindSpec) -> None:
    if spec.name in _KINDS:
        raise ValueError(f"task kind {spec.name!r} is registered twice")
    _KINDS[spec.name] = spec


def task_kinds() -> list[str]:
    return sorted(_KINDS)


def task_kind_spec(name: str) -> TaskKindSpec:
    if name not in _KINDS:
        raise ConfigError(f"task.kind={name!r} is not one of: {', '.join(task_kinds())}")
    return _KINDS[name]


def check_task(cfg: Any) -> None:
    """The active kind's rules against the whole config (`ExperimentConfig.validate`)."""
    spec = task_kind_spec(cfg.task.kind)
    if spec.methods is not None and cfg.tuning.method not in spec.methods:
        raise ConfigError(f"tuning.method={cfg.tuning.method!r} is not built for task.kind="
                          f"{spec.name!r}; use one of: {', '.join(spec.methods)}")
    spec.check(cfg)


def _no_check(cfg: Any) -> None:
    return None


# Strategy plugins a causal-LM run can take (population expansion's "fixed" and "anneal"
# weightings use only partition ids, nothing a row's label or a classifier head gives).
_LM_PLUGINS = ("population_expansion",)


def _plugin(cfg: Any, name: str) -> list[dict[str, Any]]:
    """The [[plugins]] tables of plugin `name` (read before the plugins' own checks run)."""
    return [t for t in cfg.plugins if isinstance(t, dict) and t.get("name") == name]


def _weighting(table: dict[str, Any]) -> Any:
    return table.get("weighting", "fixed")  # the plugin's default (strategies.plugins)


def _unbuilt_plugins(cfg: Any) -> list[Any]:
    return [t.get("name") if isinstance(t, dict) else t for t in cfg.plugins
            if not isinstance(t, dict) or t.get("name") not in _LM_PLUGINS]


# What a causal-LM run cannot do yet, each with the key to change: (test, message).
_LM_REFUSALS: tuple[tuple[Callable[[Any], bool], str], ...] = (
    (lambda c: c.split.enabled and c.split.local_loss_fraction > 0,
     "split.local_loss_fraction > 0 (an auxiliary classifier's loss) is not built for "
     "task.kind='causal_lm' yet; set split.local_loss_fraction=0"),
    (lambda c: _plugin(c, "el2n_pruning"),
     "plugins: el2n_pruning scores each example by the error of its class prediction, and "
     "task.kind='causal_lm' has no classes; remove that [[plugins]] table"),
    (lambda c: any(_weighting(t) == "importance" for t in _plugin(c, "population_expansion")),
     "plugins: population_expansion weighting='importance' reads a domain classifier on "
     "pooled features (tuning.domain_head), which task.kind='causal_lm' does not have; use "
     "weighting='fixed' or 'anneal'"),
    (lambda c: bool(_unbuilt_plugins(c)),
     "plugins other than population_expansion are not built for task.kind='causal_lm' "
     "yet; remove the other [[plugins]] tables"),
    (lambda c: bool(c.data.labels),
     "data.labels names classes, but task.kind='causal_lm' rows have no label; remove it"),
    (lambda c: c.data.partition == "dirichlet",
     "data.partition='dirichlet' splits by label, but task.kind='causal_lm' rows have none; "
     "use data.partition='natural' (one client per data.by value) or 'iid'"),
    (lambda c: c.tuning.domain_head or c.tuning.head_hidden > 0,
     "tuning.domain_head and tuning.head_hidden shape a classification head; "
     "task.kind='causal_lm' keeps the model's LM head: leave them at false and 0"),
    (lambda c: c.train.prefix_cache == "on",
     "train.prefix_cache='on' is not built for task.kind='causal_lm' yet; use 'auto' or 'off'"),
    (lambda c: c.privacy.sample.enabled and c.privacy.sample.grad_sample_mode == "ghost",
     "privacy.sample.grad_sample_mode='ghost' wraps a classification loss; "
     "task.kind='causal_lm' uses 'hooks', 'functorch' or 'ew'"),
    (lambda c: c.model.max_length < 2,
     "model.max_length=1 leaves a text no next token to predict (task.kind='causal_lm' "
     "scores each token from the ones before it); set model.max_length >= 2"),
)

# The generation metric's total work, in token positions the decoder runs: greedy decoding
# without a KV cache reruns the whole sequence for each new token, so a text costs
# new x (prompt + (new - 1) / 2). The defaults (32 texts, 64 + 16 tokens) are 36,608, about
# a minute per model for SmolLM2 on 2 CPU cores (docs/language-models.md); the bound is
# about half an hour there (each key's own bound alone allows years).
GENERATION_POSITIONS_MAX = 1_000_000


def generation_positions(task: TaskConfig) -> int:
    """Token positions the generation metric runs the decoder over for one model."""
    new, prompt = task.generation_new_tokens, task.generation_prompt_tokens
    return task.generation_examples * new * (2 * prompt + new - 1) // 2


def _check_generation_work(cfg: Any) -> None:
    task = cfg.task
    work = generation_positions(task)
    if work > GENERATION_POSITIONS_MAX:
        raise ConfigError(
            f"task.generation_examples={task.generation_examples} x "
            f"task.generation_new_tokens={task.generation_new_tokens} on "
            f"task.generation_prompt_tokens={task.generation_prompt_tokens}-token prompts is "
            f"{work:,} decoder token positions (no KV cache), past the bound of "
            f"{GENERATION_POSITIONS_MAX:,} (about half an hour per model on 2 CPU cores); "
            "lower them, or set task.generation_examples=0")


def _check_causal_lm(cfg: Any) -> None:
    for refused, message in _LM_REFUSALS:
        if refused(cfg):
            raise ConfigError(message)
    _check_generation_work(cfg)
    prompt = cfg.tuning.settings("prompt") if cfg.tuning.method == "prompt" else None
    if prompt is not None and prompt.layer > 0:
        raise ConfigError("tuning.prompt.layer > 0 is not built for task.kind='causal_lm' "
                          "yet; the prompt enters at the word embeddings: set it to 0")


register_task_kind(TaskKindSpec(DEFAULT_KIND, None, False, _no_check))
register_task_kind(TaskKindSpec("causal_lm", ("lora", "prompt", "slash"), True,
                                _check_causal_lm))
