"""`budget-align ui` (`make ui`): the MLflow UI over the repository's runs, opening on the runs table.

MLflow 3's UI opens an experiment on its GenAI overview, no runs in sight, until one switches to "Model training";
the URL printed, and opened where a browser is at hand, is the runs table with that switch set
(`tracking.runs_page`; tests/test_ui.py checks it in headless Chromium).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from budget_alignment.params import Params
from budget_alignment.tracking import runs_page, tracking_uri
from budget_alignment.tracking_store import experiment_id


def mlflow_executable() -> str:
    beside = Path(sys.executable).with_name("mlflow")
    return str(beside) if beside.is_file() else (shutil.which("mlflow") or "mlflow")


def ui_command(params: Params, host: str, port: int) -> tuple[list[str] | None, str]:
    """The `mlflow ui` command over the project's tracking store, and the URL of the experiment's runs table.

    The experiment is created (and tagged) if no stage has run yet. With `MLFLOW_TRACKING_URI` pointing at a server
    there is nothing to start: the command is None and the URL is that server's runs table.
    """
    import mlflow

    uri = tracking_uri()
    experiment = experiment_id(mlflow.MlflowClient(uri), params.tracking.experiment)
    if uri.startswith(("http://", "https://")):
        return None, runs_page(uri, experiment)
    # One worker: one user's browser (the default, four, costs seconds and a GB more to start).
    command = [mlflow_executable(), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    command += ["--workers", "1"]
    return command, runs_page(f"http://{host}:{port}", experiment)


def has_browser() -> bool:
    """A graphical browser can open (a desktop session); on a headless server the URL is only printed."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def wait_until_up(url: str, server: subprocess.Popen | None = None, timeout_s: float = 60.0) -> bool:
    """Whether the server behind `url` answers `/health` within `timeout_s` (False at once if it exited)."""
    health = url.split("/#", 1)[0].rstrip("/") + "/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(health, timeout=2):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def serve(command: list[str], url: str, *, open_browser: bool) -> int:
    """Run the UI until it exits or Ctrl-C; open `url` in a browser once it answers, where there is one."""
    server = subprocess.Popen(command)
    try:
        if open_browser and has_browser() and wait_until_up(url, server):
            import webbrowser

            webbrowser.open(url)
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return server.wait()
