"""MLflow tracking: one run per stage instance in $DVC_ROOT/mlflow.db; a dead server never fails a stage."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from budget_alignment import tracking, tracking_store
from budget_alignment.params import load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return load_params(REPO / "params.yaml")


@pytest.fixture
def dvc_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_flatten_keeps_lists_whole():
    assert tracking.flatten({"grpo": {"clip_high": 0.28, "init": ["base", "sft"]}, "seed": 1}) == {
        "grpo.clip_high": 0.28,
        "grpo.init": ["base", "sft"],
        "seed": 1,
    }


def test_stage_run_lands_in_the_dvc_root_database(dvc_root, params, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "grpo@sft-ja")
    monkeypatch.setenv("DVC_EXP_NAME", "clip-sweep-1")
    with tracking.stage_run("grpo", params, ["grpo"]) as run:
        run.log_metrics({"reward": 0.5, "ignored_flag": True})
        output = dvc_root / "out.txt"
        output.write_text("x" * 100)
        run.add_output(output)
        run.add_budget(tokens_generated=1234)

    assert (dvc_root / "mlflow.db").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{dvc_root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
    assert len(runs) == 1
    found = runs[0]
    assert found.info.run_name == "grpo@sft-ja"
    assert found.info.status == "FINISHED"
    assert found.data.tags["profile"] == "tiny"
    assert found.data.tags["dvc_exp_name"] == "clip-sweep-1"
    assert found.data.tags["stage"] == "grpo@sft-ja"
    assert len(found.data.tags["git_commit"]) in (40, len("unknown"))
    assert found.data.params["grpo.clip_high"] == str(params.grpo.clip_high)
    assert found.data.params["grpo.reward_weights.language"] == "0.2"
    assert "sft.learning_rate" not in found.data.params  # only the sections the stage reads
    assert found.data.metrics["reward"] == 0.5
    assert "ignored_flag" not in found.data.metrics
    assert found.data.metrics["budget.bytes_written"] == 100
    assert found.data.metrics["budget.tokens_generated"] == 1234

    budget = json.loads((dvc_root / "reports/budget/grpo@sft-ja.json").read_text())
    assert budget["stage"] == "grpo@sft-ja"
    assert budget["bytes_written"] == 100 and budget["tokens_generated"] == 1234
    assert budget["wall_seconds"] >= 0 and budget["peak_rss_bytes"] > 10_000_000


def test_the_experiment_is_machine_learning_a_kind_chosen_in_the_ui_is_kept_and_its_runs_page_is_known(
    dvc_root, params
):
    """The stages tag their experiment as machine learning; tests/test_ui.py opens runs_page in a browser."""
    with tracking.stage_run("report", params, ["report"]):
        pass
    mlflow.set_tracking_uri(f"sqlite:///{dvc_root / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
    assert experiment.tags[tracking_store.EXPERIMENT_KIND_TAG] == "custom_model_development"
    mlflow.MlflowClient().set_experiment_tag(
        experiment.experiment_id, tracking_store.EXPERIMENT_KIND_TAG, "genai_development"
    )
    with tracking.stage_run("report", params, ["report"]):
        pass
    experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
    assert experiment.tags[tracking_store.EXPERIMENT_KIND_TAG] == "genai_development"
    page = tracking.runs_page("http://127.0.0.1:5000/", experiment.experiment_id)
    assert page == f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"


def test_failed_stage_marks_the_run_failed_and_writes_no_budget(dvc_root, params):
    with pytest.raises(RuntimeError), tracking.stage_run("sft", params, ["sft"]):
        raise RuntimeError("boom")
    mlflow.set_tracking_uri(f"sqlite:///{dvc_root / 'mlflow.db'}")
    (found,) = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
    assert found.info.status == "FAILED"
    assert not (dvc_root / "reports/budget/sft.json").exists()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def journal_entries(root: Path) -> list[dict]:
    (journal,) = (root / ".cache/tracking/outbox").glob("*.jsonl")
    return [json.loads(line) for line in journal.read_text().splitlines()]


def test_a_server_dead_from_the_start_warns_and_everything_waits_in_the_outbox(dvc_root, params, monkeypatch, caplog):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    report = dvc_root / "report.json"
    report.write_text('{"rows": 3}')
    with caplog.at_level(logging.WARNING), tracking.stage_run("merge", params, ["merge"]) as run:
        run.log_metrics({"x": 1.0}, step=3)
        run.log_artifact(report, "quality")
        assert run.active  # it logs, into the outbox
    assert "not reachable" in caplog.text and "sync-tracking" in caplog.text
    assert json.loads((dvc_root / "reports/budget/merge.json").read_text())["stage"] == "merge"
    run_entry, metrics, artifact, budget, end = journal_entries(dvc_root)
    assert run_entry["kind"] == "run" and run_entry["uri"] == uri and run_entry["run_id"] is None
    assert run_entry["stage"] == "merge" and run_entry["params"]["merge.method"] == "linear"
    assert run_entry["tags"]["profile"] == "tiny"
    assert metrics["metrics"] == {"x": 1.0} and metrics["step"] == 3 and metrics["timestamp"] > 0
    kept = dvc_root / ".cache/tracking/outbox" / Path(artifact["file"]).name
    assert artifact["artifact_path"] == "quality" and not kept.exists()  # in the journal's own folder
    assert budget["metrics"]["budget.bytes_written"] == 0
    assert end["kind"] == "end" and end["status"] == "FINISHED"


def test_a_store_that_fails_mid_run_loses_nothing_and_the_next_send_delivers_it(dvc_root, params, monkeypatch):
    """The store takes the run, then refuses to store an artifact (its folder is not writable): that and everything
    after waits in the outbox, and the next send delivers it with the original steps and times."""
    import mlflow

    uri = f"sqlite:///{dvc_root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    blocked = dvc_root / "artifacts"
    blocked.write_text("a file where the artifact store's folder should be")
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    client.create_experiment(params.tracking.experiment, artifact_location=(blocked / "store").as_uri())
    report = dvc_root / "report.json"
    report.write_text('{"rows": 3}')
    with tracking.stage_run("sft", params, ["sft"]) as run:
        run.log_metrics({"loss": 2.0}, step=1)
        run.log_artifact(report, "quality")
        run.log_metrics({"loss": 1.0}, step=2)
    (found,) = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
    assert found.info.status == "RUNNING"  # its end waits in the outbox too
    kinds = [entry["kind"] for entry in journal_entries(dvc_root)]
    assert kinds == ["run", "created", "artifact", "metrics", "metrics", "end"]  # loss@2, then the budget

    blocked.unlink()
    report_of_send = tracking_store.send_outbox()
    assert not report_of_send.left and len(report_of_send.sent) == 1, report_of_send
    assert not list((dvc_root / ".cache/tracking/outbox").iterdir())
    found = client.get_run(found.info.run_id)
    assert found.info.status == "FINISHED" and found.data.params["sft.max_steps"] == str(params.sft.max_steps)
    history = client.get_metric_history(found.info.run_id, "loss")
    assert [(point.step, point.value) for point in history] == [(1, 2.0), (2, 1.0)]
    assert history[0].timestamp <= history[1].timestamp < found.info.end_time
    assert "budget.wall_seconds" in found.data.metrics
    (artifact,) = client.list_artifacts(found.info.run_id, "quality")
    assert artifact.path == "quality/report.json"
    assert tracking_store.send_outbox().sent == []  # sent once


def test_tracking_can_be_switched_off(dvc_root, params):
    off = params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})
    with tracking.stage_run("report", off, []) as run:
        assert not run.active
    assert not (dvc_root / "mlflow.db").exists()


def test_a_killed_stage_leaves_its_run_failed_with_what_it_logged(dvc_root):
    # The run is held by a helper process; kill -9 of the stage must not leave it RUNNING for ever.
    script = (
        "import os, signal\n"
        "from budget_alignment import tracking\n"
        "from budget_alignment.params import load_params\n"
        f"params = load_params({str(REPO / 'params.yaml')!r})\n"
        "with tracking.stage_run('sft@ja', params, ['sft']) as run:\n"
        "    run.log_metrics({'train.loss': 1.5})\n"
        "    assert run.active\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=dvc_root, timeout=120)
    assert result.returncode == -signal.SIGKILL
    # The helper notices the closed pipe, logs what it holds and closes the run. The store is read with sqlite until
    # then: MLflow here would create the schema the helper is creating (on a busy machine, it may not have yet).
    store = f"file:{dvc_root / 'mlflow.db'}?mode=ro"
    for _ in range(120):
        with contextlib.suppress(sqlite3.OperationalError), sqlite3.connect(store, uri=True) as db:
            if [status for (status,) in db.execute("SELECT status FROM runs")] not in ([], ["RUNNING"]):
                break
        time.sleep(0.5)
    mlflow.set_tracking_uri(f"sqlite:///{dvc_root / 'mlflow.db'}")
    (found,) = mlflow.search_runs(experiment_names=["budget-alignment"], output_format="list")
    assert found.info.status == "FAILED"
    assert found.data.metrics["train.loss"] == 1.5
    assert not (dvc_root / "reports/budget/sft@ja.json").exists()
    assert not list((dvc_root / ".cache/tracking/outbox").glob("*"))  # all delivered: no journal left
