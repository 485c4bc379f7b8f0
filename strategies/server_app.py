"""The ServerApp object, built without importing what its main runs.

`fedtune run` builds it as soon as Ray is up, while the driver still imports torch and the
server code in another thread (`fedtune.sim.driver`): the ServerApp's thread waits for those
imports (`Preparation.imported`) before it imports `strategies.server`, so no module is
imported by two threads at once.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import ExperimentConfig
from strategies.preparation import Preparation, RoundCallback


def build_server_app(cfg: ExperimentConfig | None = None, out_dir: Path | None = None,
                     on_round: RoundCallback | None = None, resume: bool = False,
                     prepare: Preparation | None = None) -> ServerApp:
    """The ServerApp for `cfg` (else the run config's), writing the run folder `out_dir`.
    With `prepare`, it first discovers the workers (discovery needs no task, so the workers
    answer it while the task is still being built; a failed build cuts the wait short),
    then finishes the preparation; what that raises ends the run before the run folder is
    touched (`strategies.server.serve`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_when_imported(grid, context.run_config, cfg, out_dir, on_round, resume, prepare)

    return app


def run_when_imported(grid: Grid, run_config: dict[str, Any], cfg: ExperimentConfig | None,
                      out_dir: Path | None, on_round: RoundCallback | None, resume: bool,
                      prepare: Preparation | None) -> None:
    """The ServerApp's main: wait for the driver's imports, then import and run the server."""
    if prepare is not None:
        prepare.imported()
    from fedtune.config.flower_run import config_from_run_config
    from strategies.server import serve

    run_cfg = cfg or config_from_run_config(run_config)
    folder = out_dir or Path(str(run_config.get("out", "") or
                                 f"runs/{run_cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"))
    roster = run_config.get("roster")  # a deployment's operator roster file, if any
    serve(grid, run_cfg, folder, on_round, resume, prepare, str(roster) if roster else None)


# The `flwr run` / SuperLink component (pyproject.toml): the config comes from the run config.
app = build_server_app()
