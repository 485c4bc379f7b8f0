"""`fedtune audit ...`: run the shipped attacks against a run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:  # imported when a command runs: it brings torch
    from fedtune.audit.split_attack import AttackResult

audit_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="Attack a run as its server could, and report what leaks.")
console = Console()


@audit_app.callback()
def _root() -> None:
    """Attacks shipped with fedtune, run against a run folder (`fedtune audit split RUN`)."""


@audit_app.command()
def split(
    run: Annotated[Path, typer.Argument(help="A split run's folder (its config.toml and, "
                                             "when finished, final state).")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key for the replayed round, key=value "
                      "(e.g. split.cut_layer=0).")] = None,
    victim: Annotated[int, typer.Option(help="The attacked client's partition id.")] = 0,
    public: Annotated[int, typer.Option(
        help="Examples of other clients the attacker holds as public text.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Replay one round of a client through the real split client and attack what the
    server receives: token recovery (cut 0: nearest neighbour on the embedding table;
    cut 1 or more: a ridge map fitted on public text) and label recovery (gradient
    direction against the global tail)."""
    from fedtune.audit.split_attack import audit_run

    if victim < 0 or public < 1:
        console.print(f"[bold red]error:[/] --victim must be >= 0 and --public >= 1 "
                      f"(got {victim}, {public})", highlight=False)
        raise typer.Exit(code=2)
    try:
        result = audit_run(run, set_ or [], victim=victim, public_examples=public)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    console.print(report_text(result, victim), highlight=False, markup=False)


def report_text(r: AttackResult, victim: int) -> str:
    """The console's report of one split audit; the client's epsilon with its marks."""
    protection = "smashed DP" if r.smashed_dp else "none (smashed data in clear)"
    return (
        f"cut {r.cut_layer}, protection: {protection}; client {victim}: {r.examples} "
        f"examples, {r.tokens} tokens\n"
        f"  token recovery {r.token_recovery:.1%} (baseline, most frequent token: "
        f"{r.token_baseline:.1%})\n"
        f"  label recovery {r.label_recovery:.1%} (baseline, majority label: "
        f"{r.label_baseline:.1%}); mean per-label recall {r.label_balanced:.1%}\n"
        f"  client epsilon after the round: {r.epsilon_shown()}")
