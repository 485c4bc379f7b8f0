"""Test-wide settings: offline, quiet, and caches inside a per-session temp dir."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session", autouse=True)
def _fedtune_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    if "FEDTUNE_TEST_KEEP_CACHE" not in os.environ:
        os.environ["FEDTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedtune-cache"))
