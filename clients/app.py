"""The ClientApp object, built without importing what its handlers run.

`fedtune run` builds it as soon as Ray is up, while the driver still imports torch and the
client code in another thread; each handler imports `clients.handlers` where it runs (a worker
has imported it as its process started: `fedtune.sim.warmup`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.config import ExperimentConfig


def build_client_app(cfg: ExperimentConfig | None = None, task_bundle: str | None = None
                     ) -> ClientApp:
    """The ClientApp for `cfg` (else the run config's). `task_bundle` is a folder written
    by `fedtune.task.task.write_bundle` that the workers read their task from."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        from clients.handlers import handle_query

        return handle_query(msg, context, cfg, task_bundle)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from clients.handlers import handle_train
        from fedtune.config.flower_run import config_from_run_config

        return handle_train(msg, context, cfg or config_from_run_config(context.run_config),
                            task_bundle)

    return app


# The `flwr run` / SuperNode component (pyproject.toml): the config comes from the run config.
app = build_client_app()
