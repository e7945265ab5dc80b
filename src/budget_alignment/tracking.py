"""MLflow tracking and budget accounting, one run per stage instance.

The tracking store is sqlite at `$DVC_ROOT/mlflow.db` unless `MLFLOW_TRACKING_URI` is set, so runs from
`dvc exp run --temp/--queue` workspaces land in the repository's database. Tracking is best effort: if the
store cannot be reached the stage warns and still finishes, and its DVC metrics files are complete.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from budget_alignment import paths
from budget_alignment.io import write_json

log = logging.getLogger(__name__)

# Set before mlflow or dvc is imported anywhere in the process.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# A tracking server that is down must cost seconds, not minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.repo_root().resolve() / 'mlflow.db'}"


# The experiment's kind, as MLflow 3's UI records it when asked "GenAI apps & agents or Machine learning?": these runs
# are machine learning. (The UI's landing page is decided by its GenAI / Model training switch, not by this tag:
# `runs_page` is the URL that opens on the runs table.) A kind someone chose in the UI is kept.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(name: str) -> str:
    """The experiment's id (created if missing), tagged to open on its runs table. Call with the tracking URI set."""
    import mlflow

    experiment = mlflow.set_experiment(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def runs_page(server: str, experiment: str) -> str:
    """The runs table of an experiment in MLflow 3's UI on a server (`http://127.0.0.1:5000`). Without
    `workflowType=machine_learning` the UI opens on its GenAI side (an experiment's Overview, no runs in sight) until
    one switches to "Model training"; the switch is the UI's, stored in the browser, so the URL carries it."""
    return f"{server.rstrip('/')}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"grpo": {"clip_high": 0.28}}` -> `{"grpo.clip_high": 0.28}`; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def mlflow_key(name: str) -> str:
    """MLflow refuses `@` in metric names: `grpo_sft.fr.aime25.pass@10` is logged as `...pass_at_10`."""
    return name.replace("@", "_at_")


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=paths.repo_root(), capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _server_reachable(uri: str) -> bool:
    """A quick TCP probe, so a stopped server is noticed at once instead of after HTTP retries."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=3):
            return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process and of its finished children (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024


def _cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


class StageRun:
    """What a stage reports while it runs: metrics, artifacts and the outputs whose size counts as written.

    In a stage the MLflow run is held by a helper process (`_TrackingProcess`); in a rank of a re-launched training
    stage, which joins the launching process's run by its id, the rank logs itself.
    """

    def __init__(self, stage: str, mlflow_run_id: str | None = None, tracker: _TrackingProcess | None = None) -> None:
        self.stage = stage
        self._run_id = mlflow_run_id
        self._tracker = tracker
        self.outputs: list[Path] = []
        self.budget: dict[str, float] = {}

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id (None without tracking); waits for the helper process to have opened the run."""
        return self._tracker.run_id if self._tracker is not None else self._run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def share_with_trainers(self) -> bool:
        """Let a transformers Trainer (this process's or a launched rank's) log into this run; whether there is one."""
        if not self.active:
            return False
        os.environ["MLFLOW_RUN_ID"] = str(self.run_id)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
        if self._tracker is not None:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = self._tracker.experiment
        return True

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        numeric = {
            mlflow_key(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self._tracker is not None:
            self._tracker.send("metrics", numeric, step)
        elif self.active:
            _log_metrics(self._run_id, numeric, step, self.stage)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file as it is now (its bytes are read at once, so a later rewrite does not change the artifact)."""
        path = Path(path)
        if self._tracker is not None:
            self._tracker.send("artifact", path.name, path.read_bytes(), artifact_path)
        elif self.active:
            _log_artifact(self._run_id, path, artifact_path, self.stage)

    def add_output(self, path: str | Path) -> None:
        self.outputs.append(Path(path))

    def add_budget(self, **figures: float) -> None:
        """Stage-specific budget figures (tokens trained, tokens generated, GPU seconds, ...)."""
        self.budget.update(figures)


_PENDING = object()


class _TrackingProcess:
    """A stage's MLflow run, held by a helper process that logs what the stage sends it, in order.

    Importing mlflow and opening the sqlite store cost 3-4 s of CPU in every stage (92 stages in the tiny run): the
    helper spends them on the second core while the stage imports its own libraries and works. The stage waits for
    it at the end, or earlier only when a Trainer must join the run. If the stage is killed, the helper sees its end
    of the pipe close and marks the run FAILED.
    """

    def __init__(self, stage: str, experiment: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: the stage may hold torch's threads
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_serve_run,
            args=(child, tracking_uri(), experiment, stage, dict(tags), dict(params)),
            name=f"mlflow {stage}",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._run_id: Any = _PENDING
        self.stage, self.experiment = stage, experiment

    @property
    def run_id(self) -> str | None:
        if self._run_id is _PENDING:
            try:
                self._run_id = self._connection.recv()
            except (EOFError, OSError):
                self._run_id = None
        return self._run_id

    def send(self, *message: Any) -> None:
        try:
            self._connection.send(message)
        except OSError as error:  # the helper died: tracking must never fail a stage
            log.warning("MLflow: could not log for %s: %s", self.stage, error)

    def close(self, status: str) -> None:
        self.send("end", status)
        self._process.join(timeout=CLOSE_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("MLflow: the run of %s did not close within %d s; leaving it", self.stage, CLOSE_TIMEOUT_S)
            self._process.terminate()
        self._connection.close()


# How long a finished stage waits for its helper to log what is left and close the run.
CLOSE_TIMEOUT_S = 120


def _serve_run(connection, uri: str, experiment: str, stage: str, tags: dict, params: dict) -> None:
    """The helper process: open the run, send its id (or None), then log each message until the stage ends."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_id = _start_mlflow_run(uri, experiment, stage, tags, params)
    connection.send(run_id)
    status = "FAILED"  # unless the stage says otherwise before its end of the pipe closes
    with tempfile.TemporaryDirectory(prefix="mlflow-artifacts-") as scratch:
        while True:
            try:
                kind, *arguments = connection.recv()
            except (EOFError, OSError):
                break
            if kind == "end":
                status = arguments[0]
                break
            if run_id is None:
                continue
            if kind == "metrics":
                numeric, step = arguments
                _log_metrics(run_id, numeric, step, stage)
            elif kind == "artifact":
                name, data, artifact_path = arguments
                copy = Path(tempfile.mkdtemp(dir=scratch)) / name  # a folder each: names may repeat
                copy.write_bytes(data)
                _log_artifact(run_id, copy, artifact_path, stage)
    if run_id is not None:
        _end_mlflow_run(run_id, status)


def _log_metrics(run_id: str, numeric: Mapping[str, float], step: int | None, stage: str) -> None:
    if not numeric:
        return
    try:
        import mlflow

        mlflow.log_metrics(dict(numeric), step=step, run_id=run_id)
    except Exception as error:  # tracking must never fail a stage
        log.warning("MLflow: could not log metrics for %s: %s", stage, error)


def _log_artifact(run_id: str, path: Path, artifact_path: str | None, stage: str) -> None:
    try:
        import mlflow

        mlflow.MlflowClient().log_artifact(run_id, str(path), artifact_path)
    except Exception as error:  # tracking must never fail a stage
        log.warning("MLflow: could not log artifact %s for %s: %s", path.name, stage, error)


def _start_mlflow_run(
    uri: str, experiment: str, stage: str, tags: Mapping[str, str], params: Mapping[str, Any]
) -> str | None:
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        run = client.create_run(experiment_id(experiment), run_name=stage, tags=dict(tags))
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # the REST API takes at most 100 params a call
            client.log_batch(run.info.run_id, params=items[start : start + 100])
        return run.info.run_id
    except Exception as error:  # tracking must never fail a stage
        log.warning("MLflow: could not start a run for %s at %s: %s", stage, uri, error)
        return None


def _end_mlflow_run(run_id: str, status: str) -> None:
    try:
        import mlflow

        mlflow.MlflowClient().set_terminated(run_id, status=status)
    except Exception as error:
        log.warning("MLflow: could not close run %s: %s", run_id, error)


def stage_name(default: str) -> str:
    """The DVC stage instance (`grpo@sft-ja`) when DVC runs the command, else `default`."""
    return os.environ.get("DVC_STAGE") or default


@contextmanager
def stage_run(stage: str, params: Any, sections: list[str]) -> Iterator[StageRun]:
    """Track one stage instance: an MLflow run with the params it reads, and its budget figures.

    `params` is the validated `Params`; only `sections` (plus profile and seed) are logged, the same keys the
    stage lists under `params:` in dvc.yaml.
    """
    stage = stage_name(stage)
    dumped = params.model_dump(mode="json")
    logged = flatten({"profile": dumped["profile"], "seed": dumped["seed"]})
    for section in sections:
        value = dumped
        for part in section.split("."):
            value = value[part]
        logged.update(flatten({section: value}) if isinstance(value, Mapping) else {section: value})
    tracker = None
    if params.tracking.enabled:
        uri = tracking_uri()
        if _server_reachable(uri):
            tags = {
                "stage": stage,
                "profile": params.profile,
                "git_commit": git_commit() or "unknown",
                "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            }
            try:
                tracker = _TrackingProcess(stage, params.tracking.experiment, tags, logged)
            except OSError as error:  # tracking must never fail a stage
                log.warning("MLflow: could not start the tracking process for %s: %s", stage, error)
        else:
            log.warning("MLflow tracking server %s is not reachable; %s runs without tracking", uri, stage)
    run = StageRun(stage, tracker=tracker)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        budget = {
            "wall_seconds": round(time.perf_counter() - started, 3),
            "cpu_seconds": round(_cpu_seconds() - cpu_started, 3),
            "peak_rss_bytes": _peak_rss_bytes(),
            "bytes_written": sum(_size_of(p) for p in run.outputs),
            **run.budget,
        }
        if status == "FINISHED":
            write_json(paths.budget_file(stage), {"stage": stage, **budget})
        run.log_metrics({f"budget.{k}": v for k, v in budget.items()})
        if tracker is not None:
            tracker.close(status)
