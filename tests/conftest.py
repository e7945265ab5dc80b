"""Shared fixtures: the repository root, the test data extracts, the tiny model, and isolated tracking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_train_helpers import worker_threads

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small extracts of real public data, with their sources and licenses (fixtures/README.md): the suite needs nothing
# outside the repository.
FIXTURES = Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Before torch is imported: this process's threads, and those of every process it starts that sets none of its own.
# A pytest-xdist worker inherits the controller's environment, so a worker sets its own share whatever it inherited.
if "PYTEST_XDIST_WORKER" in os.environ or "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(worker_threads())
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A folder with the tiny chat model every model test uses and its tokenizer (test_train_helpers.py builds it)."""
    from test_train_helpers import save_tiny_model

    return save_tiny_model(tmp_path / "tiny-model")


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path_factory, monkeypatch):
    """Keep every test's MLflow runs out of the repository's mlflow.db."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    for name in ("MLFLOW_RUN_ID", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)


def pytest_collection_modifyitems(items):
    """The e2e module first: under `pytest -n` (make test) one worker takes it, the longest run of the suite, at the
    start, while the others share the rest; collected last, it would start when the rest is nearly done."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


@pytest.fixture(scope="session", autouse=True)
def _loadgroup_keeps_groups(request):
    """Under `--dist loadgroup` each worker's grouped tests carry their group in their id (`...@e2e`): that suffix is
    how pytest-xdist keeps a group on one worker. Without it (pytest-dev/pytest-xdist#1386) the group spreads over the
    workers and each runs its module's `dvc repro` fixture: fail every test at once rather than pay that silently."""
    if not getattr(request.config.option, "loadgroup", False):
        return
    items = request.session.items
    ungrouped = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if ungrouped:
        pytest.fail(
            f"--dist loadgroup does not group {ungrouped[0]} (and {len(ungrouped) - 1} more): this pytest and "
            "pytest-xdist do not work together (pytest-dev/pytest-xdist#1386); install what pyproject.toml asks",
            pytrace=False,
        )
