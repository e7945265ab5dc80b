"""The data stages through the CLI on the bundled data, their parameters and their DVC wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from budget_alignment.cli import app
from budget_alignment.params import ParamsError, load_params
from budget_alignment.records import Problem, read_records, write_records

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working folder with the committed tiny params (tracking off); paths are relative to it."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return tmp_path


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_the_data_stages_run_through_the_cli(project):
    for dataset in ("chains", "college_math"):
        invoke("ingest", dataset)
        invoke("translate", dataset, "ja")
        for lang in ("ja", "en"):
            invoke("normalize", dataset, lang)
    english = read_records(project / "data/ingested/chains.jsonl", Problem)
    assert len(english) >= 24 and all(p.lang == "en" for p in english)
    assert read_records(project / "data/translated/chains/en.jsonl", Problem) == english
    for dataset in ("chains", "college_math"):
        ingested = read_records(project / f"data/ingested/{dataset}.jsonl", Problem)
        for lang in ("ja", "en"):
            normalized = read_records(project / f"data/normalized/{dataset}/{lang}.jsonl", Problem)
            assert [p.id for p in normalized] == [p.id for p in ingested]
            assert [p.answer for p in normalized] == [p.answer for p in ingested]
            assert all(p.lang == lang and "normalize" in p.provenance for p in normalized)
    ja = read_records(project / "data/normalized/college_math/ja.jsonl", Problem)
    assert all(p.answer_type == "choice" and p.answer in p.choices for p in ja)
    for report in ("ingest/chains", "translate/chains-ja", "normalize/chains-ja", "normalize/chains-en"):
        assert json.loads((project / f"reports/data_quality/{report}.json").read_text())["success"]
    assert (project / "reports/budget/normalize@chains-ja.json").is_file()


def test_a_contract_violation_fails_the_command_cleanly(project):
    invoke("ingest", "math")
    invoke("translate", "math", "fr")
    translated = project / "data/translated/math/fr.jsonl"
    records = read_records(translated, Problem)
    write_records(translated, [records[0].model_copy(update={"answer": "-1"}), *records[1:]])
    result = runner.invoke(app, ["normalize", "math", "fr"])
    assert result.exit_code == 1
    assert "answer_unchanged" in result.output and records[0].id in result.output
    assert "Traceback" not in result.output
    assert not (project / "data/normalized/math/fr.jsonl").exists()


def test_cli_errors_are_one_line(project):
    for args, message in [
        (["ingest", "nosuch"], "dataset 'nosuch' is not in params"),
        (["translate", "chains", "de"], "has no entry for 'de'"),
        (["normalize", "chains", "de"], "normalize has no entry for 'de'"),
        (["normalize", "chains", "ja"], "run the translate stage of chains first"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.output, result.output


def _raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw["datasets"]["chains"]["translation"].pop("fr"), "datasets.chains.translation.fr: missing"),
        (
            lambda raw: raw["datasets"]["math"]["translation"].update(
                ja={"machine": {**raw["translate"], "model": "x"}}
            ),
            "datasets.math.translation.ja.machine: differs from `translate`",
        ),
        (lambda raw: raw["normalize"].pop("en"), "normalize: no entry for ['en']"),
        (
            lambda raw: raw["datasets"]["math"]["translation"]["ja"].update(machine=raw["translate"]),
            "give exactly one of `human`",
        ),
    ],
)
def test_data_params_rules(tmp_path, edit, message):
    raw = _raw_params()
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert message in str(error.value)


def test_each_dvc_stage_tracks_only_its_own_params():
    from dvc.repo import Repo

    params = load_params(REPO / "params.yaml")
    with Repo(str(REPO)) as repo:
        tracked = {
            stage.addressing: sorted(p for dep in stage.deps if hasattr(dep, "params") for p in dep.params)
            for stage in repo.index.stages
        }
    expected = {}
    for dataset in params.datasets:
        expected[f"ingest@{dataset}"] = [f"datasets.{dataset}.limit", f"datasets.{dataset}.source"]
        for lang in params.languages:
            expected[f"translate@{dataset}-{lang}"] = [f"datasets.{dataset}.translation.{lang}"]
        for lang in ("en", *params.languages):
            expected[f"normalize@{dataset}-{lang}"] = [f"normalize.{lang}"]
    assert {name: tracked.get(name) for name in expected} == expected


@pytest.mark.slow
def test_a_tracked_stage_logs_its_data_quality_report_to_mlflow(project, monkeypatch):
    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    raw["tracking"]["enabled"] = True
    (project / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(variable, raising=False)
    invoke("ingest", "medicine")
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("budget-alignment").experiment_id])
    assert run.info.run_name == "ingest@medicine" and run.info.status == "FINISHED"
    assert run.data.params["datasets.medicine.source.name"] == "medicine"
    assert run.data.metrics["records"] == 12
    names = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "data_quality")}
    assert "data_quality/medicine.json" in names
    assert any(name.endswith(".html") for name in names)
