"""Hub sources without the network: the paper profile's datasets from a local mirror (tests/hub_mirror.py), read
with the real `datasets.load_dataset` and the real loaders, through `budget-align ingest` and `translate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from budget_alignment.cli import app
from budget_alignment.data.sources import SourceError, load_source, mirror_configs
from budget_alignment.fingerprints import tree_digest
from budget_alignment.params import HubDatasetSource, load_params
from budget_alignment.records import Problem, read_records
from hub_mirror import PAPER_HUB_DATASETS, bundled, write_hub_mirror

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """`datasets` keeps its arrow files under the project's cache: a test's own."""
    monkeypatch.setenv("BUDGET_ALIGNMENT_CACHE", str(tmp_path / ".cache"))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    return write_hub_mirror(tmp_path_factory.mktemp("mirror") / "hub")


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def paper_project(tmp_path, monkeypatch, mirror):
    """The paper profile composed from conf/ with `hub_mirror` set and tracking off, in a working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("BUDGET_ALIGNMENT_CACHE", str(tmp_path / ".cache"))
    overrides = ["profile=paper", f"hub_mirror={mirror}", "tracking.enabled=false"]
    invoke("compose-params", "--config-dir", str(REPO / "conf"), *overrides)
    return tmp_path, load_params(tmp_path / "params.yaml")


def test_the_mirror_holds_every_hub_dataset_the_paper_profile_reads(mirror, tmp_path):
    result = runner.invoke(
        app, ["compose-params", "-o", str(tmp_path / "p.yaml"), "--config-dir", str(REPO / "conf"), "profile=paper"]
    )
    assert result.exit_code == 0, result.output
    params = load_params(tmp_path / "p.yaml")
    wanted = set()
    for dataset in params.datasets.values():
        for source in [dataset.source, *(entry.human for entry in dataset.translation.values())]:
            if isinstance(source, HubDatasetSource):
                wanted.add((source.repo_id, source.config, source.split))
    held = {(repo, config, split) for repo, pairs in PAPER_HUB_DATASETS.items() for config, split in pairs}
    assert wanted == held
    for repo_id, pairs in PAPER_HUB_DATASETS.items():
        configs = mirror_configs(mirror / repo_id)
        for config, split in pairs:
            assert split in configs[config or "default"], (repo_id, config, split)


@pytest.mark.slow
def test_every_paper_dataset_ingests_from_the_mirror_through_the_cli(paper_project, mirror):
    root, params = paper_project
    expected = {"chains": 30, "math": 40 + 24, "college_math": 12, "aime25": 12, "gpqa": 12, "medicine": 12}
    # Besides the hub sets, the top-up's own set (bundled: the post names none), read by topup@{lang} when it is on.
    assert set(params.datasets) == {*expected, "topup_math"}
    assert params.datasets["topup_math"].source.kind == "bundled"
    for dataset, count in expected.items():
        invoke("ingest", dataset)
        records = read_records(root / f"data/ingested/{dataset}.jsonl", Problem)
        assert len(records) == count, dataset
        source = params.datasets[dataset].source
        provenance = records[0].provenance
        assert provenance["source"] == "hub" and provenance["repo_id"] == source.repo_id
        assert provenance["revision"] == source.revision and provenance["mirror"] == "hub"
        assert provenance["sha256"] == tree_digest(mirror / source.repo_id, contents=True)
        report = json.loads((root / f"reports/data_quality/ingest/{dataset}/en.json").read_text())
        assert report["success"] and report["rejected"] == 0
    chains = read_records(root / "data/ingested/chains.jsonl", Problem)
    assert [p.solution for p in chains] == [row["solution"] for row in bundled("chains", "en")]
    math = read_records(root / "data/ingested/math.jsonl", Problem)
    assert math[-1].id.startswith("test/") and math[-1].provenance["subject"]
    gpqa = read_records(root / "data/ingested/gpqa.jsonl", Problem)
    assert [p.answer for p in gpqa] == [row["answer"] for row in bundled("science", "en")]
    assert all(list(p.choices) == list("ABCD") for p in gpqa)
    medicine = read_records(root / "data/ingested/medicine.jsonl", Problem)
    assert all(len(p.choices) == 4 and p.provenance["config"] == "professional_medicine" for p in medicine)

    # The human translations of the evaluation sets, from the same mirror (MMMLU filtered to one subject).
    for dataset in ("college_math", "medicine", "aime25", "gpqa"):
        invoke("translate", dataset)
        for lang in ("ja", "fr", "es"):
            english = read_records(root / f"data/ingested/{dataset}.jsonl", Problem)
            translated = read_records(root / f"data/translated/{dataset}/{lang}.jsonl", Problem)
            assert [p.id for p in translated] == [p.id for p in english], (dataset, lang)
            assert [p.answer for p in translated] == [p.answer for p in english]
            source = translated[0].provenance["translation"]["source"]
            assert source["mirror"] == "hub" and source["split" if dataset in ("aime25", "gpqa") else "config"]
    ja = read_records(root / "data/translated/college_math/ja.jsonl", Problem)
    assert ja[0].question == bundled("college_math", "ja")[0]["question"]


def test_what_the_mirror_lacks_is_one_line_naming_it(mirror):
    def source(**fields) -> HubDatasetSource:
        return HubDatasetSource(revision="main", loader="mmlu", **fields)

    cases = [
        (source(repo_id="nobody/nothing"), "no copy of nobody/nothing"),
        (source(repo_id="cais/mmlu", config="anatomy"), "no config 'anatomy' (configs: college_mathematics, "),
        (source(repo_id="cais/mmlu", config="college_mathematics", split="dev"), "no split 'dev' (splits: test)"),
    ]
    for wrong, message in cases:
        with pytest.raises(SourceError) as failure:
            load_source(wrong, "x", "en", hub_mirror=str(mirror))
        assert message in str(failure.value) and "\n" not in str(failure.value)
        assert str(mirror) in str(failure.value)


def test_the_commit_a_download_recorded_is_the_resolved_commit(tmp_path):
    mirror = tmp_path / "mirror"
    write_hub_mirror(mirror, limit=2)
    commit = "0123456789abcdef0123456789abcdef01234567"
    metadata = mirror / "GAIR/LIMO/.cache/huggingface/download/limo.jsonl.metadata"
    metadata.parent.mkdir(parents=True)
    metadata.write_text(f"{commit}\nabc\n1700000000.0\n", encoding="utf-8")
    records = load_source(
        HubDatasetSource(repo_id="GAIR/LIMO", revision=commit, split="train", loader="limo"),
        "chains",
        "en",
        hub_mirror=str(mirror),
    )
    assert len(records) == 2 and records[0].provenance["resolved_commit"] == commit
