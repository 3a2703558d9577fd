"""Shared test setup: every test gets its own cache folder (latency tables, TensorRT timing caches),
so no test reads what another wrote and nothing lands in the user's ~/.cache."""
import pytest


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
