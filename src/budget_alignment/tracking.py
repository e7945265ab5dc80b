"""MLflow tracking and budget accounting, one run per stage instance.

The tracking store is sqlite at `$DVC_ROOT/mlflow.db` unless `MLFLOW_TRACKING_URI` is set, so runs from
`dvc exp run --temp/--queue` workspaces land in the repository's database. Tracking is best effort: if the
store cannot be reached the stage warns and still finishes, and its DVC metrics files are complete.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
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
    """What a stage reports while it runs: metrics, artifacts and the outputs whose size counts as written."""

    def __init__(self, stage: str, mlflow_run_id: str | None) -> None:
        self.stage = stage
        self.run_id = mlflow_run_id
        self.outputs: list[Path] = []
        self.budget: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _safely(self, what: str, call, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            call(*args, **kwargs)
        except Exception as error:  # tracking must never fail a stage
            log.warning("MLflow: could not %s for %s: %s", what, self.stage, error)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        numeric = {
            mlflow_key(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self._safely("log metrics", mlflow.log_metrics, numeric, step=step, run_id=self.run_id)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        import mlflow

        self._safely("log artifact", mlflow.MlflowClient().log_artifact, self.run_id, str(path), artifact_path)

    def add_output(self, path: str | Path) -> None:
        self.outputs.append(Path(path))

    def add_budget(self, **figures: float) -> None:
        """Stage-specific budget figures (tokens trained, tokens generated, GPU seconds, ...)."""
        self.budget.update(figures)


def _start_mlflow_run(stage: str, profile: str, experiment: str, params: Mapping[str, Any]) -> str | None:
    uri = tracking_uri()
    if not _server_reachable(uri):
        log.warning("MLflow tracking server %s is not reachable; %s runs without tracking", uri, stage)
        return None
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        tags = {
            "stage": stage,
            "profile": profile,
            "git_commit": git_commit() or "unknown",
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        }
        client = mlflow.MlflowClient()
        run = client.create_run(experiment_id, run_name=stage, tags=tags)
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # the REST API takes at most 100 params a call
            client.log_batch(run.info.run_id, params=items[start : start + 100])
        return run.info.run_id
    except Exception as error:  # tracking must never fail a stage
        log.warning("MLflow: could not start a run for %s at %s: %s", stage, uri, error)
        return None


def _end_mlflow_run(run_id: str | None, status: str) -> None:
    if run_id is None:
        return
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
    run_id = None
    if params.tracking.enabled:
        run_id = _start_mlflow_run(stage, params.profile, params.tracking.experiment, logged)
    run = StageRun(stage, run_id)
    if run_id:
        # The transformers Trainer's MLflow callback then logs its curves into this same run.
        os.environ["MLFLOW_RUN_ID"] = run_id
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
        os.environ["MLFLOW_EXPERIMENT_NAME"] = params.tracking.experiment
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
        _end_mlflow_run(run_id, status)
