"""An MLflow server that dies mid-stage, or answers errors, through real `budget-align` processes and a real
`mlflow server`: the stage finishes with complete DVC metrics, what it could not log waits in the outbox, and the next
stage's start or `budget-align sync-tracking` delivers it, with nothing lost (tracking.py, tracking_store.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from budget_alignment import paths
from stage_process import REPO, budget_align, start
from test_train_helpers import FAST_SFT, make_project, tiny_params, wait_for, write_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
EXPERIMENT = "outage"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` over a sqlite store, on a fixed port, that a test can kill -9 and start again."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database = folder / "mlflow.db"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.database}", "--artifacts-destination", str(self.folder / "art")],
            cwd=self.folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)

    def kill(self) -> None:
        """The server dies (with its workers) as a crash would end it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def runs(self) -> list[tuple[str, str]]:
        """(name, status) of the runs in the server's store (read from its database, whether it runs or not)."""
        if not self.database.exists():
            return []
        with sqlite3.connect(self.database) as db:
            return db.execute("SELECT name, status FROM runs").fetchall()

    def client(self):
        import mlflow

        return mlflow.MlflowClient(self.url)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    mlflow_server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    mlflow_server.start()
    yield mlflow_server
    mlflow_server.kill()


class FailingProxy:
    """A reverse proxy in front of a server that answers every request with HTTP 500 until `heal()`."""

    def __init__(self, target: str) -> None:
        self.failing = True
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = b""  # an upload of unknown length (an empty file) comes in chunks
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data

            def relay(self) -> None:
                proxy.requests += 1
                body = self.body()
                if proxy.failing:
                    self.send_response(500)
                    self.send_header("Content-Type", "text/plain")
                    self.end_headers()
                    self.wfile.write(b"Internal Server Error")
                    return
                hop = ("host", "content-length", "transfer-encoding", "connection", "keep-alive")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                data = body if self.command in ("POST", "PUT", "PATCH") else None
                request = urllib.request.Request(target + self.path, data=data, headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, payload, kind = response.status, response.read(), response.headers["Content-Type"]
                except urllib.error.HTTPError as error:
                    status, payload, kind = error.code, error.read(), error.headers["Content-Type"]
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def heal(self) -> None:
        self.failing = False

    def close(self) -> None:
        self.server.shutdown()


def journals(root: Path) -> list[Path]:
    return list((root / ".cache/tracking/outbox").glob("*.jsonl"))


def test_a_server_killed_mid_stage_loses_no_metric_once_sync_tracking_has_run(tmp_path, server):
    root = tmp_path / "project"
    make_project(root, limit=12)
    tracking = {"enabled": True, "experiment": EXPERIMENT}
    params = tiny_params(sft=FAST_SFT | {"max_steps": 4, "save_steps": 2}, tracking=tracking)
    write_params(root / "params.yaml", params)

    stage = start(root, "sft", "ja", MLFLOW_TRACKING_URI=server.url)
    wait_for(lambda: ("sft@ja", "RUNNING") in server.runs(), stage, timeout=300)
    server.kill()  # the run exists; the training has not logged a step yet
    _, log = stage.communicate(timeout=600)
    assert stage.returncode == 0, log[-3000:]  # the stage finishes
    assert "Traceback" not in log and "budget-align sync-tracking" in log
    metrics = json.loads((root / paths.training_metrics_file("sft@ja")).read_text())
    assert metrics["global_step"] == 4  # its DVC metrics are complete
    assert (root / paths.budget_file("sft@ja")).is_file()
    assert len(journals(root)) == 1 and server.runs() == [("sft@ja", "RUNNING")]

    server.start()
    sync = budget_align(root, "sync-tracking", MLFLOW_TRACKING_URI=server.url)
    assert sync.returncode == 0, sync.stderr[-3000:]
    assert sync.stdout.splitlines()[0].startswith("sent sft@ja (run ")
    assert sync.stdout.splitlines()[-1] == "the outbox is empty (1 run(s) sent)"
    assert not journals(root)

    client = server.client()
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "sft@ja"
    assert run.data.params["sft.max_steps"] == "4" and run.data.tags["profile"] == "tiny"
    # Every figure of the stage's DVC metrics, and the training curve step by step.
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert run.data.metrics[f"train.{key}"] == pytest.approx(value), key
    assert [point.step for point in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.metrics["budget.wall_seconds"] > 0
    again = budget_align(root, "sync-tracking", MLFLOW_TRACKING_URI=server.url)
    assert again.returncode == 0 and again.stdout.strip() == "the outbox is empty (0 run(s) sent)"


def test_a_server_answering_errors_is_an_outage_and_the_next_stage_sends_what_waited(tmp_path, server):
    proxy = FailingProxy(server.url)
    try:
        root = tmp_path / "project"
        root.mkdir()
        raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        raw["tracking"] = {"enabled": True, "experiment": f"{EXPERIMENT}-errors"}
        (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")

        first = budget_align(root, "ingest", "chains", MLFLOW_TRACKING_URI=proxy.url)
        assert first.returncode == 0, first.stderr[-3000:]
        assert proxy.requests and "500" in first.stderr and "Traceback" not in first.stderr
        (journal,) = journals(root)
        kinds = [json.loads(line)["kind"] for line in journal.read_text().splitlines()]
        assert kinds[0] == "run" and "metrics" in kinds and "artifact" in kinds and kinds[-1] == "end"

        proxy.heal()
        second = budget_align(root, "ingest", "math", MLFLOW_TRACKING_URI=proxy.url)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "sent from the outbox: ingest" in second.stderr
        assert not journals(root)
        client = server.client()
        experiment = client.get_experiment_by_name(f"{EXPERIMENT}-errors").experiment_id
        runs = client.search_runs([experiment])
        assert [(run.info.run_name, run.info.status) for run in runs] == [("ingest", "FINISHED")] * 2
        # The run of the first command (chains), sent from the outbox; the second (math) logged directly.
        (chains,) = [run for run in runs if "chains.en.rejected" in run.data.metrics]
        assert chains.data.params["datasets.chains.source.kind"] == "bundled"
        report = json.loads((root / paths.data_quality_report("ingest@chains", "en")).read_text())
        assert chains.data.metrics["chains.en.rejected"] == report["rejected"]
        artifacts = [a.path for a in client.list_artifacts(chains.info.run_id, "data_quality/chains/en")]
        assert "data_quality/chains/en/en.json" in artifacts
    finally:
        proxy.close()
