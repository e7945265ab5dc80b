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
from test_stages import module_closure

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


@pytest.mark.slow
def test_the_training_fixes_sets_pass_their_contracts(project):
    """The top-up's math-dense set and GRPO's medical training set, through the data stages in every language."""
    for dataset in ("topup_math", "medicine_train"):
        invoke("ingest", dataset)
        invoke("translate", dataset)
        invoke("normalize", dataset)
        english = read_records(project / f"data/ingested/{dataset}.jsonl", Problem)
        for lang in ("en", "ja", "fr", "es"):
            outcome = json.loads((project / f"reports/data_quality/normalize/{dataset}/{lang}.json").read_text())
            assert outcome["success"] and outcome["rejected"] == 0, (dataset, lang)
            normalized = read_records(project / f"data/normalized/{dataset}/{lang}.jsonl", Problem)
            assert [(p.id, p.answer) for p in normalized] == [(p.id, p.answer) for p in english]
    # Written in the form the post's normalizations aim for: they change nothing in it.
    for lang in ("ja", "fr", "es"):
        translated = read_records(project / f"data/translated/topup_math/{lang}.jsonl", Problem)
        normalized = read_records(project / f"data/normalized/topup_math/{lang}.jsonl", Problem)
        assert [p.solution for p in normalized] == [p.solution for p in translated]


def test_the_data_stages_run_through_the_cli(project):
    for dataset in ("chains", "college_math"):
        invoke("ingest", dataset)
        invoke("translate", dataset, "--lang", "ja")
        invoke("normalize", dataset, "--lang", "ja", "--lang", "en")
    english = read_records(project / "data/ingested/chains.jsonl", Problem)
    assert len(english) >= 24 and all(p.lang == "en" for p in english)
    for dataset in ("chains", "college_math"):
        ingested = read_records(project / f"data/ingested/{dataset}.jsonl", Problem)
        for lang in ("ja", "en"):
            normalized = read_records(project / f"data/normalized/{dataset}/{lang}.jsonl", Problem)
            assert [p.id for p in normalized] == [p.id for p in ingested]
            assert [p.answer for p in normalized] == [p.answer for p in ingested]
            assert all(p.lang == lang and "normalize" in p.provenance for p in normalized)
    ja = read_records(project / "data/normalized/college_math/ja.jsonl", Problem)
    assert all(p.answer_type == "choice" and p.answer in p.choices for p in ja)
    for report in ("ingest/chains/en", "translate/chains/ja", "normalize/chains/ja", "normalize/chains/en"):
        outcome = json.loads((project / f"reports/data_quality/{report}.json").read_text())
        assert outcome["success"] and outcome["rejected"] == 0
        assert (project / f"reports/data_quality/rejected/{report}.jsonl").read_text() == ""
    assert (project / "reports/budget/normalize.json").is_file()


def test_a_contract_violation_fails_the_command_cleanly(project):
    invoke("ingest", "math")
    invoke("translate", "math", "--lang", "fr")
    translated = project / "data/translated/math/fr.jsonl"
    records = read_records(translated, Problem)
    write_records(translated, [records[0].model_copy(update={"answer": "-1"}), *records[1:]])
    result = runner.invoke(app, ["normalize", "math", "--lang", "fr"])  # the tiny profile rejects nothing
    assert result.exit_code == 1
    assert "answer_unchanged" in result.output and records[0].id in result.output
    assert "Traceback" not in result.output
    assert not (project / "data/normalized/math/fr.jsonl").exists()


def test_cli_errors_are_one_line(project):
    for args, message in [
        (["ingest", "nosuch"], "dataset 'nosuch' is not in params"),
        (["translate", "chains", "--lang", "de"], "has no entry for 'de'"),
        (["normalize", "chains", "--lang", "de"], "normalize has no entry for 'de'"),
        (["normalize", "nosuch"], "dataset 'nosuch' is not in params"),
        (["normalize", "chains", "--lang", "ja"], "run `budget-align ingest chains` first"),
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
    assert run.info.run_name == "ingest" and run.info.status == "FINISHED"
    assert run.data.params["datasets.medicine.source.name"] == "medicine"
    assert run.data.metrics["medicine.en.records"] == 12 and run.data.metrics["medicine.en.rejected"] == 0
    assert run.data.params["contracts.max_rejected_fraction.ingest"] == "0.0"
    names = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "data_quality/medicine/en")}
    assert {"data_quality/medicine/en/en.json", "data_quality/medicine/en/en.jsonl"} <= names
    assert any(name.endswith(".html") for name in names)


# --- dvc.yaml (tests/test_stages.py checks every stage's deps and params) -----------------------------------------


def test_the_data_package_never_imports_training_and_contracts_never_import_translate():
    for path in (REPO / "src/budget_alignment/data").glob("*.py"):
        assert "budget_alignment.train" not in path.read_text(encoding="utf-8"), path
    contracts = module_closure("budget_alignment.data.contracts") | module_closure("budget_alignment.data.validation")
    assert "budget_alignment.data.translate" not in contracts


def test_downstream_stages_depend_on_their_language_file_inside_the_data_stage_folders():
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stages = {s.addressing: s for s in repo.index.stages}
        outs = {str(Path(out.def_path)) for out in stages["normalize"].outs}
        sft_deps = {str(Path(dep.def_path)) for dep in stages["sft@ja"].deps if not hasattr(dep, "params")}
        assert "data/normalized" in outs and "data/normalized/chains/ja.jsonl" in sft_deps
        assert stages["normalize"] in repo.index.graph.successors(stages["sft@ja"])


# --- pure outputs ----------------------------------------------------------------------------------------------


def outputs_of_the_data_stages(root: Path) -> dict[str, bytes]:
    """Every file the data stages write as DVC outputs (records, quarantine files, data-quality reports)."""
    files = {}
    for folder in ("data", "reports/data_quality"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and "docs" not in path.relative_to(root).parts:
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


@pytest.mark.slow
def test_data_outputs_are_the_same_bytes_wherever_and_whenever_they_are_made(tmp_path, monkeypatch):
    made = []
    for name in ("first", "second"):
        root = tmp_path / name
        root.mkdir()
        raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        raw["tracking"]["enabled"] = False
        (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        monkeypatch.chdir(root)
        for command in ("ingest", "translate", "normalize"):
            invoke(command, "medicine")
        made.append(outputs_of_the_data_stages(root))
    first, second = made
    assert len(first) == 1 + 3 + 4 + (1 + 3 + 4) * 2  # records, rejected files and reports of every language
    assert first == second
    for name, data in first.items():
        text = data.decode("utf-8")
        assert str(tmp_path) not in text and "/first" not in text, name
        assert '"created"' not in text and "wall_seconds" not in text, name


# --- profiles: the recipe as measured, and the post's fixes as one switch ----------------------------------------


def compose(tmp_path: Path, *overrides: str):
    output = tmp_path / "composed.yaml"
    result = runner.invoke(
        app, ["compose-params", "--output", str(output), "--config-dir", str(REPO / "conf"), *overrides]
    )
    assert result.exit_code == 0, result.output
    return load_params(output)


def test_the_paper_profile_normalizes_nothing_and_one_switch_turns_the_posts_fixes_on(tmp_path):
    from budget_alignment.data.normalize import enabled_rules

    paper = compose(tmp_path, "profile=paper")
    assert all(not enabled_rules(paper.normalize[lang]) for lang in ("en", "ja", "fr", "es"))
    fixed = compose(tmp_path, "profile=paper", "normalize=post_fixes")
    tiny = compose(tmp_path)
    assert fixed.normalize == tiny.normalize
    assert enabled_rules(fixed.normalize["ja"]) == [
        "halfwidth_digits",
        "halfwidth_operators",
        "strip_thousand_separators",
        "consistent_units",
    ]
    assert not enabled_rules(fixed.normalize["en"])
    one = compose(tmp_path, "profile=paper", "normalize.ja.halfwidth_digits=true")
    assert enabled_rules(one.normalize["ja"]) == ["halfwidth_digits"]
    assert paper.contracts.max_rejected_fraction.translate == 0.02
    assert tiny.contracts.max_rejected_fraction.model_dump() == {"ingest": 0.0, "translate": 0.0, "normalize": 0.0}


def test_the_paper_translator_is_a_pinned_local_model_that_needs_no_account(tmp_path):
    paper = compose(tmp_path, "profile=paper")
    assert paper.translate.backend == "vllm" and paper.translate.model == "Qwen/Qwen2.5-7B-Instruct"
    assert paper.translate.revision == "a09a35458c702b33eeacc393d103063234e8bc28"
    assert paper.translate.api_key_env is None
    assert all(
        entry.machine == paper.translate
        for name in ("chains", "math")
        for entry in paper.datasets[name].translation.values()
    )


def test_a_change_to_one_languages_rules_changes_only_that_languages_file(project):
    invoke("ingest", "math")
    invoke("translate", "math")
    invoke("normalize", "math")
    before = {lang: (project / f"data/normalized/math/{lang}.jsonl").read_bytes() for lang in ("en", "ja", "fr", "es")}
    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    raw["normalize"]["ja"]["consistent_units"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    invoke("normalize", "math")
    after = {lang: (project / f"data/normalized/math/{lang}.jsonl").read_bytes() for lang in ("en", "ja", "fr", "es")}
    assert after["ja"] != before["ja"]
    assert {lang: after[lang] for lang in ("en", "fr", "es")} == {lang: before[lang] for lang in ("en", "fr", "es")}


def test_compact_numeral_spacing_on_reruns_the_japanese_chains_without_the_blanks_around_numerals(project):
    """`dvc exp run -S normalize.ja.compact_numeral_spacing=true`: the Japanese file loses blanks, nothing else."""
    invoke("ingest", "chains")
    invoke("translate", "chains")
    invoke("normalize", "chains")
    before = {lang: read_records(project / f"data/normalized/chains/{lang}.jsonl", Problem) for lang in ("ja", "fr")}
    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    raw["normalize"]["ja"]["compact_numeral_spacing"] = True
    (project / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    invoke("normalize", "chains")
    after = {lang: read_records(project / f"data/normalized/chains/{lang}.jsonl", Problem) for lang in ("ja", "fr")}
    assert after["fr"] == before["fr"]

    def without_blanks(text: str) -> str:
        return "".join(text.split())

    changed = [(old, new) for old, new in zip(before["ja"], after["ja"], strict=True) if old.solution != new.solution]
    assert len(changed) == len(before["ja"])  # every chain writes "$...$ 個" or "\boxed{...} です"
    for old, new in changed:
        assert len(new.solution) < len(old.solution) and without_blanks(new.solution) == without_blanks(old.solution)
        assert new.answer == old.answer and new.provenance["normalize"]["rules"][-1] == "compact_numeral_spacing"
