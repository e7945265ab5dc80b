"""Delivering a stage run's records to the MLflow tracking store; the outbox keeps what the store does not take.

A stage's view of tracking (its run, the helper process that holds it, the ranks' relay) is tracking.py's; this module
is what that helper, and `budget-align sync-tracking`, use to talk to the store: the MLflow client calls, one
`Delivery` per run, the outbox's journals and `send_outbox`.

Tracking never fails a stage, and an outage loses nothing. Whatever the store does not take (it is down from the start,
dies mid-run, or answers errors) goes to the outbox, `paths.tracking_outbox()`: one journal per stage run, a line per
message (each line one append), artifacts as files beside it. The stage finishes normally and its DVC metrics files are
complete. The next stage sends the outbox on its start (in its helper, best effort, for a while, never failing) and
`budget-align sync-tracking` sends it on demand; metrics keep the step and time they were logged with, so the run ends
up as it would have without the outage (MLflow keeps a metric logged twice with the same step, time and value once).
A store that refuses a message as invalid (a bad metric name) is not an outage: that message is dropped with a warning.
A run whose stage was killed (its helper with it) is closed as FAILED by the next send.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budget_alignment import paths

log = logging.getLogger(__name__)

# Set before mlflow or dvc is imported anywhere in the process.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# A tracking server that is down must cost seconds, not minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# Closing a run on a server prints a link to stdout, which is the commands' own (sync-tracking reports there).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

# The tag that names a stage run before the store gives it an id (so that an outbox never creates it twice).
RUN_KEY = "run_key"
# MLflow's limits per log_batch call.
_METRICS_PER_CALL, _PARAMS_PER_CALL = 1000, 100
# MLflow's answers that refuse a message for good (a retry would be refused again): not an outage.
_REJECTIONS = {
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "MALFORMED_REQUEST",
    "INVALID_STATE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
}


# The experiment's kind, as MLflow 3's UI records it when asked "GenAI apps & agents or Machine learning?": these runs
# are machine learning. (The UI's landing page is decided by its GenAI / Model training switch, not by this tag:
# `tracking.runs_page` is the URL that opens on the runs table.) A kind someone chose in the UI is kept.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(client: Any, name: str) -> str:
    """The experiment's id in the store of an `MlflowClient`, created if missing, tagged with its kind."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def now_ms() -> int:
    return int(time.time() * 1000)


# --- the outbox ------------------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """A stage run as MLflow should have it: where, what it is, and its id once the run exists there."""

    uri: str
    experiment: str
    stage: str
    tags: dict[str, str]
    params: dict[str, Any]
    start_ms: int
    run_id: str | None = None


class Outbox:
    """One stage run's journal in the outbox: the run first, then every message the store did not take, in order.

    The journal is locked while its run is open, so that no one sends it half-written; a run that closes with
    everything delivered removes its journal. A journal left without its end is a run whose stage was killed.
    """

    def __init__(self, record: RunRecord) -> None:
        folder = paths.tracking_outbox()
        self.path = folder / f"{record.stage}-{uuid.uuid4().hex[:12]}.jsonl"
        self.artifacts = self.path.with_suffix("")
        self.pending = 0
        self._handle: Any = None
        # Locked and given its first line before it takes its name: a sender never sees a journal without its run.
        starting = folder / f".{self.path.name}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._handle = starting.open("a", encoding="utf-8")
            fcntl.flock(self._handle, fcntl.LOCK_EX)
            self._handle.write(json.dumps({"kind": "run", **record.__dict__}, ensure_ascii=False) + "\n")
            self._handle.flush()
            starting.rename(self.path)
        except OSError as error:  # a full disk: tracking must never fail a stage
            log.warning("MLflow: cannot keep %s's tracking for later in %s: %s", record.stage, folder, error)
            if self._handle is not None:
                self._handle.close()
                self._handle = None
            starting.unlink(missing_ok=True)

    def append(self, entry: Mapping[str, Any]) -> bool:
        """Append one line (one write); False if it could not be kept (the message is then lost, with a warning)."""
        if self._handle is None:
            return False
        try:
            self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._handle.flush()
        except OSError as error:  # a full disk: tracking must never fail a stage
            log.warning("MLflow: could not keep a %s message for later in %s: %s", entry["kind"], self.path, error)
            return False
        if entry["kind"] not in ("run", "created"):
            self.pending += 1
        return True

    def keep_artifact(self, name: str, data: bytes, artifact_path: str | None) -> bool:
        stored = f"{len(list(self.artifacts.glob('*')))}-{name}" if self.artifacts.exists() else f"0-{name}"
        try:
            self.artifacts.mkdir(parents=True, exist_ok=True)
            (self.artifacts / stored).write_bytes(data)
        except OSError as error:
            log.warning("MLflow: could not keep artifact %s for later in %s: %s", name, self.artifacts, error)
            return False
        return self.append({"kind": "artifact", "file": stored, "name": name, "artifact_path": artifact_path})

    def close(self) -> None:
        """Release the journal: removed when nothing waits in it, else left for the next send."""
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            if not self.pending:
                self.path.unlink(missing_ok=True)
            self._handle.close()
        self._handle = None


def _rejected(error: Exception) -> bool:
    """Whether the store refused a message for good (sending it again would not help)."""
    return getattr(error, "error_code", None) in _REJECTIONS


class Delivery:
    """Sends a run's messages to MLflow while the store takes them; from the first failure on, to the outbox."""

    def __init__(self, record: RunRecord, reachable: bool) -> None:
        self.record = record
        self.outbox = Outbox(record)
        self.down = True
        if reachable:
            try:
                _create_run(record, lambda run_id: self.outbox.append({"kind": "created", "run_id": run_id}))
                self.down = False
            except Exception as error:
                self._outage("start a run", error)
        else:
            log.warning("MLflow tracking store %s is not reachable; %s logs into the outbox", record.uri, record.stage)

    def _outage(self, what: str, error: Exception) -> None:
        self.down = True
        log.warning(
            "MLflow: could not %s for %s at %s (%s); what it logs waits in %s until the next stage or "
            "`budget-align sync-tracking` sends it",
            what,
            self.record.stage,
            self.record.uri,
            str(error).splitlines()[0] if str(error) else type(error).__name__,
            self.outbox.path,
        )

    def _deliver(self, what: str, send) -> bool:
        """Whether `send()` delivered (or the store refused the message for good, which is logged and dropped)."""
        if self.down:
            return False
        try:
            send()
            return True
        except Exception as error:
            if _rejected(error):
                log.warning("MLflow refused to %s for %s: %s", what, self.record.stage, error)
                return True
            self._outage(what, error)
            return False

    def metrics(self, numeric: Mapping[str, float], step: int | None, timestamp: int) -> None:
        batch = [(numeric, step, timestamp)]
        if not self._deliver("log metrics", lambda: _log_metrics(self.record.uri, self.record.run_id, batch)):
            self.outbox.append({"kind": "metrics", "metrics": dict(numeric), "step": step, "timestamp": timestamp})

    def artifact(self, name: str, data: bytes, artifact_path: str | None, scratch: Path) -> None:
        def send() -> None:
            copy = Path(tempfile.mkdtemp(dir=scratch)) / name  # a folder each: names may repeat
            copy.write_bytes(data)
            _client(self.record.uri).log_artifact(self.record.run_id, str(copy), artifact_path)

        if not self._deliver(f"log artifact {name}", send):
            self.outbox.keep_artifact(name, data, artifact_path)

    def end(self, status: str) -> None:
        end_ms = now_ms()
        if not self._deliver("close the run", lambda: _terminate(self.record.uri, self.record.run_id, status, end_ms)):
            self.outbox.append({"kind": "end", "status": status, "end_ms": end_ms})
        self.outbox.close()
        if self.outbox.pending:
            log.warning(
                "MLflow: %d message(s) of %s wait in %s (sent by the next stage, or `budget-align sync-tracking`)",
                self.outbox.pending,
                self.record.stage,
                self.outbox.path,
            )


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _create_run(record: RunRecord, created: Callable[[str], Any], *, again: bool = False) -> None:
    """Create the run with its tags, say so (`created(run_id)`, before anything else can fail), log its params.

    A store may create the run and die before its answer arrives: when the journal is sent (`again`), the run is
    first looked for by its `run_key` tag, so that it is not created twice.
    """
    client = _client(record.uri)
    experiment = experiment_id(client, record.experiment)
    key = record.tags.get(RUN_KEY)
    found = again and key and client.search_runs([experiment], f"tags.{RUN_KEY} = '{key}'", max_results=1)
    if found:
        record.run_id = found[0].info.run_id
    else:
        tags = dict(record.tags)
        record.run_id = client.create_run(experiment, record.start_ms, tags, record.stage).info.run_id
    created(record.run_id)
    _log_params(record)


def _log_params(record: RunRecord) -> None:
    """The run's params (logging them again with the same values changes nothing)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(record.params.items())]
    for start in range(0, len(items), _PARAMS_PER_CALL):
        _client(record.uri).log_batch(record.run_id, params=items[start : start + _PARAMS_PER_CALL])


def _log_metrics(uri: str, run_id: str, batches: list[tuple[Mapping[str, float], int | None, int]]) -> int:
    from mlflow.entities import Metric

    metrics = [
        Metric(key, value, timestamp, step or 0)
        for numeric, step, timestamp in batches
        for key, value in numeric.items()
    ]
    for start in range(0, len(metrics), _METRICS_PER_CALL):
        _client(uri).log_batch(run_id, metrics=metrics[start : start + _METRICS_PER_CALL])
    return len(metrics)


def _terminate(uri: str, run_id: str, status: str, end_ms: int) -> None:
    _client(uri).set_terminated(run_id, status=status, end_time=end_ms)


# --- sending the outbox ----------------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    """What a send of the outbox did: a line per run sent, per journal the store refused (removed), and why each
    journal left in the outbox stays."""

    sent: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def send_outbox(uri: str | None = None, budget_s: float | None = None) -> SyncReport:
    """Send the outbox's journals to their stores (only those for `uri` if given), oldest first, within `budget_s`.

    A journal in use (its stage still runs) is skipped; one whose store fails stays for the next send. Never raises.
    """
    report = SyncReport()
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    folder = paths.tracking_outbox()
    journals = sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    for journal in journals:
        if deadline is not None and time.monotonic() > deadline:
            report.left.append(f"{journal.name}: not sent yet (out of time)")
            continue
        try:
            line = _send_journal(journal, uri)
        except Exception as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            if _rejected(error):  # sending it again would be refused again
                journal.unlink(missing_ok=True)
                report.dropped.append(f"{journal.name}: refused by the store ({first})")
            else:  # the store failed again: the journal stays as it was
                report.left.append(f"{journal.name}: {first}")
            continue
        if line is not None:
            (report.left if line.startswith("!") else report.sent).append(line.removeprefix("!"))
    return report


def _send_journal(journal: Path, uri: str | None) -> str | None:
    """Send one journal and remove it; a line saying what was sent, `!reason` if it stays, None if not ours."""
    try:
        handle = journal.open("a+", encoding="utf-8")
    except FileNotFoundError:
        return None  # sent by another process meanwhile
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"!{journal.name}: its stage is still running"
        if not journal.exists() or os.stat(journal).st_ino != os.fstat(handle.fileno()).st_ino:
            return None  # sent and removed while this process waited for it
        handle.seek(0)
        entries = []
        for text in handle.read().splitlines():
            with contextlib.suppress(ValueError):  # a torn last line: the stage died while writing it
                entries.append(json.loads(text))
        if not entries or entries[0].get("kind") != "run":
            return f"!{journal.name}: not a tracking journal (remove it)"
        head = {k: v for k, v in entries[0].items() if k != "kind"}
        record = RunRecord(**head)
        if uri is not None and record.uri != uri:
            return None
        for entry in entries:
            if entry["kind"] == "created":
                record.run_id = entry["run_id"]
        created = record.run_id is None
        if created:

            def keep(run_id: str) -> None:  # so that a send cut short does not create the run twice
                handle.write(json.dumps({"kind": "created", "run_id": run_id}) + "\n")
                handle.flush()

            _create_run(record, keep, again=True)
        else:
            _log_params(record)  # the run may have been created before its params could be logged
        batches = [(e["metrics"], e["step"], e["timestamp"]) for e in entries if e["kind"] == "metrics"]
        count = _log_metrics(record.uri, record.run_id, batches) if batches else 0
        artifacts = journal.with_suffix("")
        sent_artifacts = 0
        for entry in entries:
            if entry["kind"] == "artifact" and (artifacts / entry["file"]).is_file():
                with tempfile.TemporaryDirectory(prefix="mlflow-artifact-") as scratch:
                    copy = Path(scratch) / entry["name"]
                    copy.write_bytes((artifacts / entry["file"]).read_bytes())
                    _client(record.uri).log_artifact(record.run_id, str(copy), entry["artifact_path"])
                sent_artifacts += 1
        ends = [e for e in entries if e["kind"] == "end"]
        # No end: the stage and its helper were killed; the run ends FAILED at its last sign of life.
        status, end_ms = (ends[-1]["status"], ends[-1]["end_ms"]) if ends else ("FAILED", _last_time(entries))
        _terminate(record.uri, record.run_id, status, end_ms)
        journal.unlink()
        with contextlib.suppress(OSError):
            for path in artifacts.glob("*"):
                path.unlink()
            artifacts.rmdir()
    what = [f"{count} metric value(s)" if count else "", f"{sent_artifacts} artifact(s)" if sent_artifacts else ""]
    done = ", ".join(filter(None, ["run created" if created else "", *what, status]))
    return f"{record.stage} (run {record.run_id}, {record.uri}): {done}"


def _last_time(entries: list[Mapping[str, Any]]) -> int:
    times = [e.get("timestamp") or e.get("start_ms") or 0 for e in entries]
    return max(times) if times else now_ms()
