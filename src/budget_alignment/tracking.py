"""MLflow tracking and budget accounting as a stage sees them: one run per stage instance; an outage loses nothing.

The tracking store is sqlite at `$DVC_ROOT/mlflow.db` unless `MLFLOW_TRACKING_URI` is set, so runs from
`dvc exp run --temp/--queue` workspaces land in the repository's database. A stage's run is held by a helper process
(`_TrackingProcess`) that logs what the stage sends it: the run with its params and tags, metrics with their steps and
times, artifacts, the final status. Tracking never fails a stage: what the store does not take waits in the outbox
until the next stage or `budget-align sync-tracking` sends it (tracking_store.py, which also holds the MLflow client
calls).

Training curves come through the same path: the Trainers report to a callback (`train/trainer_setup.py`) that logs
through the stage's run, not through transformers' own MLflow callback, which talks to the server itself and, during
an outage, would raise inside training or drop the curves. The ranks of a re-launched training stage write their
metrics to a relay file that the launching process, which holds the run, forwards as they come (`StageRun.relay`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import resource
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from budget_alignment import paths
from budget_alignment.io import OutputError, write_json
from budget_alignment.tracking_store import RUN_KEY, Delivery, RunRecord, now_ms, send_outbox

log = logging.getLogger(__name__)

# How long a stage's helper spends sending the outbox of earlier runs, at most.
REPLAY_BUDGET_S = 30.0
# How long a finished stage waits for its helper to log what is left and close the run.
CLOSE_TIMEOUT_S = 120


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.repo_root().resolve() / 'mlflow.db'}"


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

    The messages go to a sink: the helper process that holds the MLflow run (`_TrackingProcess`), the outbox when the
    store cannot be reached at the start (`_OutboxSink`), or, in a rank of a re-launched training stage, the relay file
    that the launching process forwards (`_RelaySink`). Without a sink (tracking off) only the budget is kept.
    """

    def __init__(self, stage: str, sink: Any = None) -> None:
        self.stage = stage
        self._sink = sink
        self.outputs: list[Path] = []
        self.budget: dict[str, float] = {}

    @property
    def active(self) -> bool:
        """Whether what the stage logs goes anywhere (to MLflow, now or after an outage)."""
        return self._sink is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        numeric = {
            mlflow_key(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self._sink is not None and numeric:
            self._sink.send("metrics", numeric, step, now_ms())

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file as it is now (its bytes are read at once, so a later rewrite does not change the artifact)."""
        path = Path(path)
        if self._sink is not None:
            self._sink.send("artifact", path.name, path.read_bytes(), artifact_path)

    def add_output(self, path: str | Path) -> None:
        self.outputs.append(Path(path))

    def add_budget(self, **figures: float) -> None:
        """Stage-specific budget figures (tokens trained, tokens generated, GPU seconds, ...)."""
        self.budget.update(figures)
        if isinstance(self._sink, _RelaySink):  # a rank: the launching process writes the budget
            self._sink.send("budget", figures)

    @contextmanager
    def relay(self) -> Iterator[dict[str, str]]:
        """For a re-launched training stage: the environment its ranks need to log into this run. What they log is
        forwarded as it comes, and the rest when the block ends."""
        folder = paths.tracking_relay()
        relay = folder / f"{self.stage}-{uuid.uuid4().hex[:12]}.jsonl"
        stop = threading.Event()
        position = 0

        def forward() -> None:
            nonlocal position
            if not relay.exists():
                return
            with relay.open("rb") as handle:
                handle.seek(position)
                for line in handle:
                    if not line.endswith(b"\n"):
                        break  # a line a rank is still writing
                    position += len(line)
                    with contextlib.suppress(ValueError):
                        kind, *arguments = json.loads(line)
                        if kind == "metrics":
                            numeric, step, timestamp = arguments
                            if self._sink is not None:
                                self._sink.send("metrics", numeric, step, timestamp)
                        elif kind == "budget":
                            self.budget.update(arguments[0])

        def follow() -> None:
            while not stop.wait(1.0):
                forward()

        thread = threading.Thread(target=follow, name=f"relay {self.stage}", daemon=True)
        thread.start()
        try:
            yield {RELAY_VARIABLE: str(relay.resolve())}
        finally:
            stop.set()
            thread.join()
            forward()
            relay.unlink(missing_ok=True)


RELAY_VARIABLE = "BUDGET_ALIGNMENT_TRACKING_RELAY"


class _RelaySink:
    """A rank's messages, appended to the relay file the launching process follows (a line per write)."""

    def __init__(self, relay: Path) -> None:
        self.relay = relay

    def send(self, kind: str, *arguments: Any) -> None:
        if kind == "artifact":
            return  # ranks log no artifacts: the launching process logs the stage's
        try:
            self.relay.parent.mkdir(parents=True, exist_ok=True)
            with self.relay.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps([kind, *arguments]) + "\n")
        except OSError as error:  # tracking must never fail a stage
            log.warning("MLflow: could not relay %s to the launching process: %s", kind, error)


def rank_run(stage: str) -> StageRun | None:
    """The run of a rank of a re-launched training stage (None when the launching process tracks nothing)."""
    relay = os.environ.get(RELAY_VARIABLE)
    return StageRun(stage_name(stage), _RelaySink(Path(relay))) if relay else None


# --- the helper process ----------------------------------------------------------------------------------------------


class _TrackingProcess:
    """A stage's MLflow run, held by a helper process that logs what the stage sends it, in order.

    Importing mlflow and opening the sqlite store cost 3-4 s of CPU in every stage (92 stages in the tiny run): the
    helper spends them on the second core while the stage imports its own libraries and works. The stage waits for
    it only at the end. If the stage is killed, the helper sees its end of the pipe close and marks the run FAILED.
    The helper also sends the outbox of earlier runs to the same store, for at most REPLAY_BUDGET_S.
    """

    def __init__(self, record: RunRecord) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: the stage may hold torch's threads
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_serve_run, args=(child, record), name=f"mlflow {record.stage}", daemon=True
        )
        self._process.start()
        child.close()
        self.stage = record.stage

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


def _serve_run(connection, record: RunRecord) -> None:
    """The helper process: open the run (or its journal), then log each message until the stage ends."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    delivery = Delivery(record, _server_reachable(record.uri))
    replay = None
    if not delivery.down:  # the store answers: send what earlier runs could not
        replay = threading.Thread(target=_send_earlier, args=(record.uri,), name="mlflow outbox", daemon=True)
        replay.start()
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
            if kind == "metrics":
                delivery.metrics(*arguments)
            elif kind == "artifact":
                delivery.artifact(*arguments, Path(scratch))
        delivery.end(status)
    if replay is not None:  # a send cut short is taken up again by the next one (see `send_outbox`)
        replay.join(timeout=5)


def _send_earlier(uri: str) -> None:
    report = send_outbox(uri, budget_s=REPLAY_BUDGET_S)
    for line in report.sent:
        log.info("MLflow: sent from the outbox: %s", line)


class _OutboxSink:
    """A stage's run while the store cannot be reached at its start: every message goes straight to the outbox (no
    helper process, no mlflow import), for the next stage or `budget-align sync-tracking` to send."""

    def __init__(self, record: RunRecord) -> None:
        self.stage = record.stage
        self.delivery = Delivery(record, reachable=False)

    def send(self, kind: str, *arguments: Any) -> None:
        if kind == "metrics":
            self.delivery.metrics(*arguments)
        elif kind == "artifact":
            self.delivery.outbox.keep_artifact(*arguments)

    def close(self, status: str) -> None:
        self.delivery.end(status)


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
    sink = None
    if params.tracking.enabled:
        tags = {
            "stage": stage,
            "profile": params.profile,
            "git_commit": git_commit() or "unknown",
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            RUN_KEY: uuid.uuid4().hex,
        }
        record = RunRecord(tracking_uri(), params.tracking.experiment, stage, tags, logged, now_ms())
        if _server_reachable(record.uri):
            try:
                sink = _TrackingProcess(record)
            except OSError as error:  # tracking must never fail a stage
                log.warning("MLflow: could not start the tracking process for %s: %s", stage, error)
        if sink is None:
            sink = _OutboxSink(record)
    run = StageRun(stage, sink)
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
            try:
                write_json(paths.budget_file(stage), {"stage": stage, **budget})
            except OutputError as error:  # a run fact, read by no stage: the finished work must not be lost for it
                log.warning("the budget of %s was not written: %s", stage, error)
        run.log_metrics({f"budget.{k}": v for k, v in budget.items()})
        if sink is not None:
            sink.close(status)
