"""Data contracts: the bundled data passes; planted defects are each caught by the check named for them; a stage
that fails its contract leaves its output as it was; within the maximum rejected fraction a defect is quarantined
instead, and a table-level failure always fails the stage."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import great_expectations as gx
import pytest

from budget_alignment import paths
from budget_alignment.data import normalize
from budget_alignment.data.contracts import problem_frame
from budget_alignment.data.expectations import CHECKS, canonical_answer, delimiters_ok, in_language, spans_restored
from budget_alignment.data.ingest import ingest_dataset
from budget_alignment.data.translate import translate_dataset
from budget_alignment.data.validation import ContractViolation, one_docs_build, validate
from budget_alignment.params import Params, load_params
from budget_alignment.records import Problem, read_records

REPO = Path(__file__).resolve().parents[1]


def make_params(max_rejected: dict[str, float] | None = None, **translation: dict) -> Params:
    """The committed tiny params, tracking off; `translation` replaces `datasets.<name>.translation.<lang>` entries."""
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["tracking"]["enabled"] = False
    raw["contracts"]["max_rejected_fraction"].update(max_rejected or {})
    for key, entry in translation.items():
        dataset, lang = key.rsplit("_", 1)
        raw["datasets"][dataset]["translation"][lang] = entry
    return Params.model_validate(raw)


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory):
    """Ingested and translated chains, math and college_math (Japanese), in a working folder of their own."""
    root = tmp_path_factory.mktemp("contracts")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("DVC_ROOT", raising=False)
        params = make_params()
        for dataset in ("chains", "math", "college_math"):
            ingest_dataset(params, dataset)
            translate_dataset(params, dataset, langs=["ja"])
        yield root, params


@pytest.fixture
def in_stage_data(stage_data, monkeypatch):
    root, params = stage_data
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return root, params


# --- row checks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reference", "same"),
    [
        ("0,5", "0.5", True),
        ("１２", "12", True),
        ("1 000", "1000", True),
        ("1,000", "1000", True),
        ("$15$", "15", True),
        ("-2,1", "-2,1", True),
        ("16", "15", False),
        ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ],
)
def test_canonical_answers(answer, reference, same):
    assert (canonical_answer(answer) == canonical_answer(reference)) is same


def test_row_checks():
    assert delimiters_ok("$x^{2}$ and \\{ \\$") == (True, True)
    assert delimiters_ok("}{") == (False, True)
    assert delimiters_ok("$x") == (True, False)
    assert spans_restored("Add 12 and $x$.", "Ajoutez $x$ à 12.")
    assert not spans_restored("Add 12 and 5.", "Ajoutez 125.")
    assert in_language("りんごを12個持っています。友だちに5個あげました。", "ja")
    assert not in_language("Mia has twelve apples and gives five of them to her friend.", "ja")


def test_the_bundled_data_passes_every_check(in_stage_data):
    _root, params = in_stage_data
    for dataset in ("chains", "college_math"):
        normalize.normalize_dataset(params, dataset, langs=["en", "ja"])
        for lang in ("en", "ja"):
            report = json.loads(paths.data_quality_report(f"normalize@{dataset}", lang).read_text())
            assert report["success"] and report["failed_checks"] == 0 and report["rejected"] == 0
            assert {"ids_aligned", "answer_unchanged", "in_target_language"} <= set(report["checks"])
            assert paths.rejected_records(f"normalize@{dataset}", lang).read_text() == ""
    report = json.loads(paths.data_quality_report("translate@chains", "ja").read_text())
    assert report["success"] and "human_answer_matches" in report["checks"]
    docs = paths.data_quality_dir() / "docs"
    index = (docs / "index.html").read_text()
    assert "normalize__chains-ja" in index and "translate__chains-ja" in index
    assert (docs / ".gitignore").read_text() == "*\n"


def test_a_data_stage_builds_its_data_docs_once_when_its_validations_are_done(in_stage_data):
    """Inside `one_docs_build` (what the data stages run in) no page is rendered until the block closes; then every
    suite validated in it has its page, and the index lists them beside the pages already on disk."""
    _root, params = in_stage_data
    docs = paths.data_quality_dir() / "docs"
    normalize.normalize_dataset(params, "math", langs=["en"])  # a page built at once, outside the block
    assert (docs / "validations" / "normalize__math-en").is_dir()
    for lang in ("en", "ja"):  # pages an earlier test may have built
        shutil.rmtree(docs / "validations" / f"normalize__college_math-{lang}", ignore_errors=True)
    with one_docs_build(None):
        normalize.normalize_dataset(params, "college_math", langs=["en", "ja"])
        assert json.loads(paths.data_quality_report("normalize@college_math", "ja").read_text())["success"]
        assert not (docs / "validations" / "normalize__college_math-ja").exists()  # results on disk, pages not yet
        assert (docs / ".results" / "normalize__college_math-ja").is_dir()
    index = (docs / "index.html").read_text()
    for suite in ("normalize__college_math-en", "normalize__college_math-ja", "normalize__math-en"):
        assert (docs / "validations" / suite).is_dir() and suite in index


# --- the corruption suite ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Defect:
    check: str
    dataset: str
    lang: str
    corrupt: Callable[[Problem, list[Problem]], Problem]
    target: int = 0  # which record is corrupted


def _update(**fields) -> Callable[[Problem, list[Problem]], Problem]:
    return lambda problem, records: problem.model_copy(update=fields)


DEFECTS = [
    Defect("required_fields", "chains", "ja", _update(question="   ")),
    Defect("ids_unique", "chains", "ja", lambda p, records: p.model_copy(update={"id": records[0].id}), target=1),
    Defect("lang_in_set", "math", "ja", _update(lang="de")),
    Defect("dataset_name", "math", "ja", _update(dataset="elsewhere")),
    Defect("answer_type_known", "math", "ja", _update(answer_type="essay")),
    Defect("choices_consistent", "college_math", "ja", _update(answer="E")),
    Defect("ids_aligned", "math", "ja", _update(id="ghost-999")),
    Defect("answer_unchanged", "math", "ja", _update(answer="999999")),
    Defect(
        "choice_count_unchanged",
        "college_math",
        "ja",
        lambda p, records: p.model_copy(update={"choices": dict(list(p.choices.items())[:3]), "answer": "A"}),
    ),
    Defect(
        "no_placeholder_left",
        "chains",
        "ja",
        lambda p, records: p.model_copy(update={"solution": p.solution + " ⟦3⟧"}),
    ),
    Defect(
        "delimiters_balanced", "chains", "ja", lambda p, records: p.model_copy(update={"question": p.question + " {"})
    ),
    Defect(
        "in_target_language",
        "chains",
        "ja",
        _update(question="Mia has twelve apples. She gives five of them to a friend and then buys eight more."),
    ),
    Defect(
        "no_fullwidth_digits",
        "chains",
        "ja",
        lambda p, records: p.model_copy(update={"question": p.question + "１２"}),
    ),
]


@pytest.mark.parametrize("defect", DEFECTS, ids=[defect.check for defect in DEFECTS])
def test_a_planted_defect_is_caught_by_its_check_and_nothing_is_written(in_stage_data, monkeypatch, defect):
    _root, params = in_stage_data
    output = paths.normalized(defect.dataset, defect.lang)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("the previous output\n", encoding="utf-8")
    clean = normalize.normalize_problem
    originals: list[Problem] = []

    def faulty_rule(problem: Problem, rules):
        result = clean(problem, rules)
        originals.append(result)
        if len(originals) - 1 == defect.target:
            return defect.corrupt(result, originals)
        return result

    # A normalization bug, planted at the stage's one transformation step.
    monkeypatch.setattr(normalize, "normalize_problem", faulty_rule)
    with pytest.raises(ContractViolation) as caught:
        normalize.normalize_dataset(params, defect.dataset, langs=[defect.lang])
    assert defect.check in caught.value.failed_checks
    assert output.read_text(encoding="utf-8") == "the previous output\n"
    message = str(caught.value)
    assert f"  {defect.check} [" in message and "nothing written" in message
    report = json.loads(paths.data_quality_report(f"normalize@{defect.dataset}", defect.lang).read_text())
    assert report["success"] is False and report["checks"][defect.check]["success"] is False
    assert report["checks"][defect.check]["unexpected"] >= 1


def _human_translation_file(tmp_path: Path, edit: Callable[[dict], None]) -> dict:
    """The bundled French chains as a local jsonl human translation, with one record edited."""
    rows = [
        json.loads(line)
        for line in (REPO / "src/budget_alignment/data/bundled/chains/fr.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    edit(rows[2])
    path = tmp_path / "chains-fr.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    fields = {"id": "id", "question": "question", "answer": "answer", "solution": "solution"}
    return {"human": {"kind": "local", "path": str(path), "fields": fields}}


@pytest.mark.parametrize(
    ("check", "edit"),
    [
        ("length_ratio", lambda row: row.update(question="Oui ?", solution="Oui.")),
        ("human_answer_matches", lambda row: row.update(answer="16")),
    ],
)
def test_translation_defects_are_caught_and_nothing_is_written(in_stage_data, tmp_path, check, edit):
    _root, _ = in_stage_data
    params = make_params(chains_fr=_human_translation_file(tmp_path, edit))
    output = paths.translated("chains", "fr")
    output.unlink(missing_ok=True)
    with pytest.raises(ContractViolation) as caught:
        translate_dataset(params, "chains", langs=["fr"])
    assert caught.value.failed_checks == {check}
    assert "chains-003" in str(caught.value)
    assert not output.exists()


@pytest.mark.parametrize("defect", [d for d in DEFECTS if d.check in ("in_target_language", "answer_unchanged")])
def test_within_the_maximum_a_defective_record_is_quarantined_not_fatal(in_stage_data, monkeypatch, defect):
    _root, _ = in_stage_data
    params = make_params(max_rejected={"normalize": 0.1})
    clean = normalize.normalize_problem
    seen: list[Problem] = []

    def faulty_rule(problem: Problem, rules):
        result = clean(problem, rules)
        seen.append(result)
        return defect.corrupt(result, seen) if len(seen) - 1 == defect.target else result

    monkeypatch.setattr(normalize, "normalize_problem", faulty_rule)
    delivered = normalize.normalize_dataset(params, defect.dataset, langs=[defect.lang])[defect.lang]
    bad = seen[defect.target].id
    stage = f"normalize@{defect.dataset}"
    assert bad not in {p.id for p in delivered} and len(delivered) == len(seen_ids := {p.id for p in seen}) - 1
    assert read_records(paths.normalized(defect.dataset, defect.lang), Problem) == delivered
    (line,) = [json.loads(line) for line in paths.rejected_records(stage, defect.lang).read_text().splitlines()]
    assert line["id"] == bad and line["checks"] == [defect.check] and line["record"]["id"] == bad
    report = json.loads(paths.data_quality_report(stage, defect.lang).read_text())
    assert report["success"] and report["rejected"] == 1 and report["records"] == len(seen_ids)
    assert report["checks"][defect.check]["success"] is False and report["checks"][defect.check]["rejected"] == 1


def test_a_table_level_failure_fails_the_stage_whatever_the_maximum(in_stage_data):
    records = load_records_of("chains")
    table_check = gx.expectations.ExpectTableRowCountToBeBetween(min_value=1000)
    table_check.meta = {"check": "enough_records"}
    outcome = validate(problem_frame(records), [table_check], "ingest@chains", "en", max_rejected_fraction=1.0)
    assert not outcome.passed and not outcome.rejected
    (failure,) = outcome.table_failures
    assert failure.check == "enough_records" and not failure.row_level
    assert "(table-level: cannot quarantine)" in str(ContractViolation([outcome]))


def load_records_of(dataset: str) -> list[Problem]:
    return read_records(paths.ingested(dataset), Problem)


def test_every_check_is_described():
    planted = {defect.check for defect in DEFECTS} | {
        "length_ratio",
        "human_answer_matches",
        "protected_spans_restored",
    }
    assert planted == set(CHECKS)


def test_when_every_record_was_quarantined_upstream_the_checks_judge_zero_rows(in_stage_data):
    from budget_alignment.data.contracts import check_translated
    from budget_alignment.params import MachineTranslationParams, TranslationParams

    english = load_records_of("chains")[:3]
    entry = TranslationParams(machine=MachineTranslationParams())
    prior = {problem.id: ["protected_spans_restored"] for problem in english}
    outcome = check_translated(
        [], english, lang="fr", entry=entry, stage="translate@chains", max_rejected_fraction=1.0, prior=prior
    )
    assert outcome.passed and not outcome.table_failures
    assert outcome.rejected == prior and outcome.rejected_fraction == 1.0
