"""`budget-align ui` (`make ui`): the MLflow UI over the repository's store, and the URL it prints opens on the runs
table of the stages' runs, not on MLflow 3's GenAI overview (checked in headless Chromium: `make test` installs
Debian's package where apt-get can, see `make browser`)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import pytest

from budget_alignment import tracking, tracking_store, ui
from budget_alignment.params import load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_serves_the_repository_store_and_points_at_the_runs_table(project):
    params = load_params(REPO / "params.yaml")
    command, url = ui.ui_command(params, "127.0.0.1", 5123)
    store = f"sqlite:///{project.resolve() / 'mlflow.db'}"
    assert command[1:] == [
        "ui",
        "--backend-store-uri",
        store,
        "--host",
        "127.0.0.1",
        "--port",
        "5123",
        "--workers",
        "1",
    ]
    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name(params.tracking.experiment)  # created before any stage ran
    assert url == f"http://127.0.0.1:5123/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert experiment.tags[tracking_store.EXPERIMENT_KIND_TAG] == tracking_store.EXPERIMENT_KIND


@pytest.fixture
def stage_run_logged(project):
    """The store after one stage run (grpo@sft-ja), as `dvc repro` leaves it."""
    params = load_params(REPO / "params.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DVC_STAGE", "grpo@sft-ja")
        with tracking.stage_run("grpo", params, ["grpo"]) as run:
            run.log_metrics({"reward": 0.5})
    return params


@pytest.mark.slow
def test_the_command_starts_a_server_whose_runs_page_and_api_answer_with_the_stage_run(stage_run_logged):
    port = free_port()
    command, url = ui.ui_command(stage_run_logged, "127.0.0.1", port)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert ui.wait_until_up(url, server, timeout_s=120), "mlflow ui did not start"
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/")
        with urllib.request.urlopen(url.split("#")[0], timeout=10) as page:  # the fragment stays in the browser
            assert page.status == 200 and "<html" in page.read().decode().lower()
        experiment = url.split("/experiments/")[1].split("/")[0]
        search = urllib.request.Request(
            f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/search",  # what the runs table asks for
            data=json.dumps({"experiment_ids": [experiment]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(search, timeout=10) as answer:
            runs = json.load(answer)["runs"]
        assert [r["info"]["run_name"] for r in runs] == ["grpo@sft-ja"]
        assert {"key": "reward", "value": 0.5} in [
            {k: m[k] for k in ("key", "value")} for m in runs[0]["data"]["metrics"]
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)


def rendered(url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran (and a screenshot of it), in headless Chromium."""
    # A profile of its own, and none of Chromium's calls home (a closed network refuses them, many at a time).
    options = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={screenshot.parent / 'chromium-profile'}",
        "--virtual-time-budget=15000",
        "--window-size=1400,900",
    ]
    subprocess.run(["chromium", *options, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    result = subprocess.run(["chromium", *options, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed (`make browser`)")
def test_the_printed_url_shows_the_stages_runs_where_the_experiment_page_shows_none(project, monkeypatch):
    params = load_params(REPO / "params.yaml")
    monkeypatch.setenv("DVC_STAGE", "grpo@sft-ja")
    with tracking.stage_run("grpo", params, ["grpo"]) as run:
        run.log_metrics({"reward": 0.5})
    port = free_port()
    command, url = ui.ui_command(params, "127.0.0.1", port)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert ui.wait_until_up(url, server, timeout_s=240), "mlflow ui did not start"
        runs = rendered(url, project / "runs.png")
        assert "grpo@sft-ja" in runs and "Model training" in runs
        # What `make ui` opened before: the experiment's own page, MLflow 3's GenAI overview, no run in sight.
        overview = rendered(url.split("/runs?")[0], project / "overview.png")
        assert "Overview" in overview and "grpo@sft-ja" not in overview
    finally:
        server.terminate()
        server.wait(timeout=30)
