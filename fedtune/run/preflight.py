"""The checks a run passes before Ray, the model or the data pass start: everything that can
be told from the config, the backbone's folder and the first line of each data file.

`fedtune run` (and `fedtune sweep`, for each variant) calls `preflight` right after the config
loaded, so a bad `data.options` key, a misspelled backbone folder or a data file without its
label column is one line within a second or two of launch, not after a minute of Ray start-up
and model loading. The checks themselves live with what they check (fedtune.data.file_checks,
fedtune.models.backbone_source); this module only runs them in order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedtune.config import ConfigError, ExperimentConfig


def _corpus(cfg: ExperimentConfig, bases: list[Path]) -> None:
    from fedtune.config.task import task_kind_spec
    from fedtune.data.file_checks import check_corpus_config

    check_corpus_config(cfg.data.corpus, cfg.data.options, bases,
                        unlabelled=task_kind_spec(cfg.task.kind).unlabelled)


def _backbone(cfg: ExperimentConfig, bases: list[Path]) -> None:
    from fedtune.models.backbone_source import check_backbone_source

    check_backbone_source(cfg.model.backbone)


def _privacy_plan(cfg: ExperimentConfig, bases: list[Path]) -> None:
    from fedtune.config.accountant_steps import check_planned_steps

    check_planned_steps(cfg)


# In order: the config's own values first (the data options, the DP plan's steps), then
# the files they name.
CHECKS: tuple[Callable[[ExperimentConfig, list[Path]], None], ...] = (_corpus, _privacy_plan,
                                                                       _backbone)


def preflight(cfg: ExperimentConfig, config_file: Path | None = None) -> None:
    """Run every pre-start check on `cfg`; the first failure is a `ConfigError` of one line.
    `config_file`: where the config was read from; a relative data file is looked for in the
    current directory and in that file's folder."""
    from fedtune.data import CorpusError
    from fedtune.models.backbone_source import BackboneSourceError

    bases = [Path.cwd()]
    if config_file is not None and config_file.parent.resolve() != Path.cwd().resolve():
        bases.append(config_file.parent.resolve())
    for check in CHECKS:
        try:
            check(cfg, bases)
        except (CorpusError, BackboneSourceError) as exc:
            raise ConfigError(str(exc)) from None
