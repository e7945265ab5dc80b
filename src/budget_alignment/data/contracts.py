"""Data contracts of the data stages: great-expectations suites, defined in code, run on a stage's output before it
is written.

Each stage instance validates its records (a pandas frame, one row a record, with the English original's fields
beside each translated one) in an ephemeral context. A failed check stops the stage with a compact report (the check,
how many rows, the first failing ids and values) and nothing is written; the full outcome of every expectation goes
to `reports/data_quality/{stage}/{instance}.json` (a DVC metrics file), to the Data Docs site under
`reports/data_quality/docs/` and to the stage's MLflow run.

Every expectation carries `meta.check`, the name of the rule it enforces (`ids_unique`, `answer_unchanged`, ...):
reports and tests refer to checks by that name. `CHECKS` lists them.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import great_expectations as gx
import pandas as pd
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation, MulticolumnMapExpectation
from great_expectations.expectations.metrics import ColumnMapMetricProvider, column_condition_partial
from great_expectations.expectations.metrics.map_metric_provider import MulticolumnMapMetricProvider
from great_expectations.expectations.metrics.map_metric_provider.multicolumn_condition_partial import (
    multicolumn_condition_partial,
)

from budget_alignment import paths
from budget_alignment.data.translate import protected_spans
from budget_alignment.io import write_json
from budget_alignment.records import CHOICE_LETTERS, Problem

if TYPE_CHECKING:
    from budget_alignment.params import TranslationParams
    from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)

CHECKS = {
    "required_fields": "id, dataset, lang, question, answer and answer_type are present and not blank",
    "ids_unique": "no id occurs twice",
    "lang_in_set": "every record is in the stage's language",
    "dataset_name": "every record names the stage's dataset",
    "answer_type_known": "answer_type is math or choice",
    "choices_consistent": "a choice problem has lettered choices A, B, ... (at least two) holding the answer letter; "
    "a math problem has none",
    "ids_aligned": "the ids are exactly the English ids",
    "answer_unchanged": "the gold answer is the English one",
    "choice_count_unchanged": "as many choices as the English record",
    "human_answer_matches": "a human translation's own answer equals the English answer (digits, separators and "
    "decimal commas aside)",
    "protected_spans_restored": "every protected span of the English text (math, numbers, code, choice letters) is "
    "in the translation",
    "no_placeholder_left": "no translation marker ⟦n⟧ is left in any text",
    "delimiters_balanced": "braces and $ stay balanced where the English text is balanced",
    "in_target_language": "question and solution are in the record's language",
    "length_ratio": "translated / English characters within the bounds in params",
    "no_fullwidth_digits": "normalized Japanese has no full-width digits",
}

# How many failing rows a report lists per check.
EXAMPLES = 20


# --- row-level checks (plain functions, so they are tested and reused outside great-expectations) ------------------

_FULLWIDTH = str.maketrans("０１２３４５６７８９．，－", "0123456789.,-")
_THOUSANDS = re.compile(r"(?<=\d)(?:,\\!|\{,\}|[ \u00a0\u202f\u2009]|,(?=\d{3}(?!\d)))(?=\d)")


def canonical_answer(answer: str) -> str:
    """An answer as a value: full-width forms, thousand separators, decimal commas, `$` and case set aside."""
    text = answer.translate(_FULLWIDTH).strip().strip("$").strip()
    text = _THOUSANDS.sub("", text)
    text = re.sub(r"(?<![\d,])(\d+),(\d+)(?![\d,])", r"\1.\2", text)
    return re.sub(r"\s+", " ", text).lower()


def delimiters_ok(text: str) -> tuple[bool, bool]:
    """(braces balanced and never closing early, an even number of unescaped $), ignoring escaped ones."""
    depth, ok, dollars = 0, True, 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            ok = ok and depth >= 0
        elif char == "$":
            dollars += 1
        i += 1
    return ok and depth == 0, dollars % 2 == 0


def spans_restored(english: str | None, translated: str | None) -> bool:
    if not english:
        return True
    if translated is None:
        return False
    wanted = Counter(english[a:b] for a, b in protected_spans(english, merge=False))
    found = Counter(translated[a:b] for a, b in protected_spans(translated, merge=False))
    return not (wanted - found)


@cache
def _language_judge():
    from budget_alignment.scoring.language import judge_language

    return judge_language


def in_language(text: str | None, lang: str) -> bool:
    """The project's language checker (scoring/language.py) on one text; too few letters to judge counts as in."""
    if not text:
        return True
    return _language_judge()(text, lang).think_in_lang


def choices_ok(answer_type: str, answer: str, letters: str) -> bool:
    if answer_type == "math":
        return letters == ""
    return len(letters) >= 2 and letters == CHOICE_LETTERS[: len(letters)] and answer in letters


# --- custom expectations -------------------------------------------------------------------------------------------


class ColumnValuesInLanguage(ColumnMapMetricProvider):
    condition_metric_name = "column_values.in_language"
    condition_value_keys = ("lang",)

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column, lang, **kwargs):
        return column.map(lambda text: in_language(text, lang))


class ExpectColumnValuesToBeInLanguage(ColumnMapExpectation):
    """Expect each text to be in `lang` by the project's language checker (too short to judge passes)."""

    lang: str
    map_metric: ClassVar[str] = "column_values.in_language"
    success_keys: ClassVar[tuple[str, ...]] = ("mostly", "lang")


class ColumnValuesWithoutMarkers(ColumnMapMetricProvider):
    condition_metric_name = "column_values.without_translation_markers"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column, **kwargs):
        return ~column.astype(str).str.contains(r"⟦\d+⟧", regex=True)


class ExpectColumnValuesToHaveNoTranslationMarkers(ColumnMapExpectation):
    """Expect no `⟦n⟧` marker of the translation's protection left in the text."""

    map_metric: ClassVar[str] = "column_values.without_translation_markers"
    success_keys: ClassVar[tuple[str, ...]] = ("mostly",)


_MULTICOLUMN_DOMAIN = ("batch_id", "table", "column_list", "row_condition", "condition_parser", "ignore_row_if")


def _rows(frame) -> list[tuple]:
    return list(frame.itertuples(index=False, name=None))


class MulticolumnSpansRestored(MulticolumnMapMetricProvider):
    condition_metric_name = "multicolumn_values.protected_spans_restored"
    condition_domain_keys = _MULTICOLUMN_DOMAIN

    @multicolumn_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_list, **kwargs):
        return pd.Series([spans_restored(en, text) for en, text in _rows(column_list)], index=column_list.index)


class ExpectProtectedSpansRestored(MulticolumnMapExpectation):
    """Expect every protected span of the English text (first column) in the translated text (second column)."""

    map_metric: ClassVar[str] = "multicolumn_values.protected_spans_restored"
    success_keys: ClassVar[tuple[str, ...]] = ("mostly",)


class MulticolumnDelimitersKept(MulticolumnMapMetricProvider):
    condition_metric_name = "multicolumn_values.delimiters_kept"
    condition_domain_keys = _MULTICOLUMN_DOMAIN

    @multicolumn_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_list, **kwargs):
        def kept(english, text):
            if text is None:
                return True
            wanted = delimiters_ok(english) if english else (True, True)
            found = delimiters_ok(text)
            return all(f or not w for w, f in zip(wanted, found, strict=True))

        return pd.Series([kept(en, text) for en, text in _rows(column_list)], index=column_list.index)


class ExpectDelimitersBalanceKept(MulticolumnMapExpectation):
    """Expect `{}` and `$` balanced in the text (second column) wherever they are in the English text (first)."""

    map_metric: ClassVar[str] = "multicolumn_values.delimiters_kept"
    success_keys: ClassVar[tuple[str, ...]] = ("mostly",)


class MulticolumnAnswersMatch(MulticolumnMapMetricProvider):
    condition_metric_name = "multicolumn_values.answers_match"
    condition_domain_keys = _MULTICOLUMN_DOMAIN

    @multicolumn_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_list, **kwargs):
        def match(answer_type, reference, answer):
            if answer is None or reference is None:
                return answer is None and reference is None
            if answer_type == "choice":
                return str(answer).strip().upper() == str(reference).strip().upper()
            return canonical_answer(str(answer)) == canonical_answer(str(reference))

        return pd.Series([match(*row) for row in _rows(column_list)], index=column_list.index)


class ExpectAnswersToMatch(MulticolumnMapExpectation):
    """Expect the answer (third column) to equal the reference (second) as a value, for the answer type (first)."""

    map_metric: ClassVar[str] = "multicolumn_values.answers_match"
    success_keys: ClassVar[tuple[str, ...]] = ("mostly",)


class MulticolumnChoicesConsistent(MulticolumnMapMetricProvider):
    condition_metric_name = "multicolumn_values.choices_consistent"
    condition_domain_keys = _MULTICOLUMN_DOMAIN

    @multicolumn_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_list, **kwargs):
        return pd.Series([choices_ok(*row) for row in _rows(column_list)], index=column_list.index)


class ExpectChoicesConsistentWithAnswer(MulticolumnMapExpectation):
    """Expect choices lettered A, B, ... holding the answer letter for `choice`, none for `math`."""

    map_metric: ClassVar[str] = "multicolumn_values.choices_consistent"
    success_keys: ClassVar[tuple[str, ...]] = ("mostly",)


# --- the frame -----------------------------------------------------------------------------------------------------

TEXT_FIELDS = ("question", "choices_text", "solution")


def _choices_text(problem: Problem) -> str | None:
    if not problem.choices:
        return None
    return "\n".join(f"{letter}. {text}" for letter, text in problem.choices.items())


def _text_length(problem: Problem) -> int:
    return len(problem.question) + len(_choices_text(problem) or "") + len(problem.solution or "")


def problem_frame(records: Sequence[Problem], english: Sequence[Problem] | None = None) -> pd.DataFrame:
    """One row a record; with `english`, the English original's fields beside each (`en_*`, null when missing)."""
    originals = {problem.id: problem for problem in english or []}
    rows = []
    for problem in records:
        choices_text = _choices_text(problem)
        row: dict[str, Any] = {
            "id": problem.id,
            "dataset": problem.dataset,
            "lang": problem.lang,
            "question": problem.question,
            "answer": problem.answer,
            "answer_type": problem.answer_type,
            "choice_letters": "".join(problem.choices or {}),
            "choice_count": len(problem.choices or {}),
            "choices_text": choices_text,
            "solution": problem.solution,
            "text": "\n".join(t for t in (problem.question, choices_text, problem.solution) if t),
            "source_answer": problem.provenance.get("translation", {}).get("source_answer")
            if isinstance(problem.provenance.get("translation"), Mapping)
            else None,
        }
        original = originals.get(problem.id)
        if english is not None:
            row.update(
                {
                    "en_answer": original.answer if original else None,
                    "en_choice_count": len(original.choices or {}) if original else None,
                    "en_question": original.question if original else None,
                    "en_choices_text": _choices_text(original) if original else None,
                    "en_solution": original.solution if original else None,
                }
            )
            # Short texts say little about a translation's completeness: the ratio is left null (not checked).
            english_length = _text_length(original) if original else 0
            row["length_ratio"] = _text_length(problem) / english_length if english_length >= 40 else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=["id", "dataset", "lang", "question", "answer", "answer_type", "text"])
    # Object columns keep None as None (pandas 3 would otherwise infer string dtypes with NaN).
    return frame.astype({column: object for column in frame.columns if column not in ("choice_count", "length_ratio")})


# --- suites --------------------------------------------------------------------------------------------------------


def _named(check: str, expectation):
    expectation.meta = {"check": check}
    return expectation


def common_expectations(dataset: str, lang: str) -> list:
    E = gx.expectations
    expectations = []
    for column in ("id", "dataset", "lang", "question", "answer", "answer_type"):
        expectations.append(_named("required_fields", E.ExpectColumnValuesToNotBeNull(column=column)))
        expectations.append(
            _named("required_fields", E.ExpectColumnValuesToNotMatchRegex(column=column, regex=r"^\s*$"))
        )
    expectations += [
        _named("ids_unique", E.ExpectColumnValuesToBeUnique(column="id")),
        _named("lang_in_set", E.ExpectColumnValuesToBeInSet(column="lang", value_set=[lang])),
        _named("dataset_name", E.ExpectColumnValuesToBeInSet(column="dataset", value_set=[dataset])),
        _named("answer_type_known", E.ExpectColumnValuesToBeInSet(column="answer_type", value_set=["math", "choice"])),
        _named(
            "choices_consistent",
            ExpectChoicesConsistentWithAnswer(
                column_list=["answer_type", "answer", "choice_letters"], ignore_row_if="never"
            ),
        ),
        _named("no_placeholder_left", ExpectColumnValuesToHaveNoTranslationMarkers(column="text")),
    ]
    return expectations


def aligned_expectations(english_ids: Sequence[str], lang: str, *, exact_answers: bool) -> list:
    """Checks of records against their English originals (translate and normalize stages)."""
    E = gx.expectations
    expectations = [
        _named("ids_aligned", E.ExpectColumnDistinctValuesToEqualSet(column="id", value_set=list(english_ids))),
        _named(
            "choice_count_unchanged",
            E.ExpectColumnPairValuesToBeEqual(column_A="choice_count", column_B="en_choice_count"),
        ),
    ]
    if exact_answers:
        expectations.append(
            _named("answer_unchanged", E.ExpectColumnPairValuesToBeEqual(column_A="answer", column_B="en_answer"))
        )
    else:
        expectations.append(
            _named(
                "answer_unchanged",
                ExpectAnswersToMatch(column_list=["answer_type", "en_answer", "answer"], ignore_row_if="never"),
            )
        )
    for column in TEXT_FIELDS:
        expectations.append(
            _named("delimiters_balanced", ExpectDelimitersBalanceKept(column_list=[f"en_{column}", column]))
        )
    for column in ("question", "solution"):
        expectations.append(_named("in_target_language", ExpectColumnValuesToBeInLanguage(column=column, lang=lang)))
    return expectations


# --- running a suite and reporting ---------------------------------------------------------------------------------


@dataclass
class CheckOutcome:
    check: str
    success: bool
    evaluated: int
    unexpected: int
    expectations: list[dict[str, Any]] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)


class ContractViolation(RuntimeError):
    """A stage's output broke its data contract; nothing was written. The message is the compact report."""

    def __init__(self, stage: str, failed: list[CheckOutcome], report: Path) -> None:
        self.stage = stage
        self.failed = failed
        self.report = report
        super().__init__(self._message())

    @property
    def failed_checks(self) -> set[str]:
        return {outcome.check for outcome in self.failed}

    def _message(self) -> str:
        lines = [
            f"{self.stage}: {len(self.failed)} data contract check(s) failed, nothing written (report: {self.report})"
        ]
        for outcome in self.failed:
            kinds = ", ".join(sorted({e["expectation"] for e in outcome.expectations if not e["success"]}))
            shown = "; ".join(_example_text(example) for example in outcome.examples[:3])
            lines.append(
                f"  {outcome.check} [{kinds}]: {outcome.unexpected} of {outcome.evaluated} failing"
                + (f"; first: {shown}" if shown else "")
            )
        return "\n".join(lines)


def _example_text(example: Mapping[str, Any]) -> str:
    ident = example.get("id")
    values = ", ".join(f"{k}={_short(v)}" for k, v in example.items() if k != "id")
    if ident is None:
        return values
    return f"{ident}: {values}" if values else str(ident)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _outcome_of(result) -> dict[str, Any]:
    config = result.expectation_config
    details = result.result or {}
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "result_format", "value_set")}
    if "value_set" in config.kwargs:
        kwargs["value_set_size"] = len(config.kwargs["value_set"])
    examples = []
    unexpected = details.get("unexpected_count")
    if "partial_missing_list" in details:  # a set expectation: which values are missing, which are extra
        unexpected = (details.get("missing_count") or 0) + (unexpected or 0)
        if unexpected:
            examples.append(
                {
                    "missing": list(details.get("partial_missing_list") or [])[:EXAMPLES],
                    "extra": list(details.get("partial_unexpected_list") or [])[:EXAMPLES],
                }
            )
    elif details.get("unexpected_index_list"):
        for item in details["unexpected_index_list"][:EXAMPLES]:
            examples.append(dict(item) if isinstance(item, Mapping) else {"value": item})
    elif not result.success:
        exception = (result.exception_info or {}).get("exception_message")
        examples.append({"exception": exception} if exception else {"observed": details.get("observed_value")})
    if unexpected is None and not result.success:
        unexpected = 1
    return {
        "expectation": config.type,
        "kwargs": _jsonable(kwargs),
        "success": bool(result.success),
        "evaluated": int(details.get("element_count") or 0),
        "unexpected": int(unexpected or 0),
        "examples": _jsonable(examples),
        "exception": (result.exception_info or {}).get("exception_message") if not result.success else None,
    }


def _gx_context(docs: Path):
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    # Results persist beside the site, so its index lists every stage instance, not only the last one.
    config.stores[config.validation_results_store_name] = {
        "class_name": "ValidationResultsStore",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs / ".results")},
    }
    config.data_docs_sites = {
        "data_quality": {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    }
    return gx.get_context(mode="ephemeral", project_config=config)


def report_path(stage: str) -> Path:
    """`translate@chains-ja` -> reports/data_quality/translate/chains-ja.json."""
    kind, _, instance = stage.partition("@")
    return paths.data_quality_dir() / kind / f"{instance or kind}.json"


def docs_dir() -> Path:
    return (paths.data_quality_dir() / "docs").resolve()


def validate(
    frame: pd.DataFrame, expectations: Sequence, stage: str, run: StageRun | None = None
) -> list[CheckOutcome]:
    """Run the expectations on the frame, write the report and the Data Docs; raise ContractViolation on failure."""
    docs = docs_dir()
    suite_name = stage.replace("@", "__")
    # A rerun replaces the stage's previous results and pages.
    shutil.rmtree(docs / ".results" / suite_name, ignore_errors=True)
    shutil.rmtree(docs / "validations" / suite_name, ignore_errors=True)
    context = _gx_context(docs)
    batch = (
        context.data_sources.add_pandas("records")
        .add_dataframe_asset(stage)
        .add_batch_definition_whole_dataframe("all records")
    )
    # Given whole: adding expectations one by one re-serializes the suite each time.
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=list(expectations)))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch, suite=suite))
    result = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]},
    )
    outcomes: dict[str, CheckOutcome] = {}
    for item in result.results:
        check = (item.expectation_config.meta or {}).get("check", item.expectation_config.type)
        details = _outcome_of(item)
        outcome = outcomes.setdefault(check, CheckOutcome(check, True, 0, 0))
        outcome.success = outcome.success and details["success"]
        # Table-level expectations (the id set) report no element count: they judge every record.
        outcome.evaluated = max(outcome.evaluated, details["evaluated"] or len(frame))
        outcome.unexpected += details["unexpected"]
        outcome.expectations.append(details)
        outcome.examples.extend(details["examples"][: EXAMPLES - len(outcome.examples)])
    report = report_path(stage)
    failed = [outcome for outcome in outcomes.values() if not outcome.success]
    write_json(
        report,
        {
            "stage": stage,
            "success": not failed,
            "records": len(frame),
            "failed_checks": len(failed),
            "checks": {
                name: {
                    "success": o.success,
                    "description": CHECKS.get(name, ""),
                    "unexpected": o.unexpected,
                    "evaluated": o.evaluated,
                    "expectations": o.expectations,
                    "examples": o.examples,
                }
                for name, o in outcomes.items()
            },
        },
    )
    _publish(context, docs, suite_name, report, run)
    if failed:
        raise ContractViolation(stage, failed, report)
    log.info("%s: %d data contract checks passed on %d records", stage, len(outcomes), len(frame))
    return list(outcomes.values())


def _publish(context, docs: Path, suite_name: str, report: Path, run: StageRun | None) -> None:
    """Data Docs and MLflow artifacts; best effort, since the JSON report already holds the outcome."""
    try:
        docs.mkdir(parents=True, exist_ok=True)
        # The site is rebuilt from results on disk; it is a view, not a pipeline output, and stays out of git.
        (docs / ".gitignore").write_text("*\n", encoding="utf-8")
        # Render this stage's page only (and the index); the other stages' pages are already on disk.
        keys = [
            key
            for key in context.validation_results_store.list_keys()
            if key.expectation_suite_identifier.name == suite_name
        ]
        context.build_data_docs(site_names=["data_quality"], resource_identifiers=keys)
    except Exception as error:  # rendering must never fail a stage
        log.warning("could not build the Data Docs site at %s: %s", docs, error)
    if run is None or not run.active:
        return
    run.log_artifact(report, "data_quality")
    # The full validation result (as the results store keeps it) and its rendered page.
    for path in [
        *(docs / ".results" / suite_name).rglob("*.json"),
        *(docs / "validations" / suite_name).rglob("*.html"),
    ]:
        run.log_artifact(path, "data_quality")


# --- the stages' contracts ------------------------------------------------------------------------------------------


def check_ingested(
    records: Sequence[Problem], *, dataset: str, stage: str, run: StageRun | None = None
) -> list[CheckOutcome]:
    frame = problem_frame(records)
    return validate(frame, common_expectations(dataset, "en"), stage, run)


def check_translated(
    records: Sequence[Problem],
    english: Sequence[Problem],
    *,
    lang: str,
    entry: TranslationParams,
    stage: str,
    run: StageRun | None = None,
) -> list[CheckOutcome]:
    dataset = english[0].dataset if english else (records[0].dataset if records else "")
    frame = problem_frame(records, english)
    expectations = common_expectations(dataset, lang) + aligned_expectations(
        [p.id for p in english], lang, exact_answers=True
    )
    E = gx.expectations
    expectations.append(
        _named(
            "length_ratio",
            E.ExpectColumnValuesToBeBetween(
                column="length_ratio", min_value=entry.min_length_ratio, max_value=entry.max_length_ratio
            ),
        )
    )
    if entry.human is not None:
        expectations.append(
            _named(
                "human_answer_matches",
                ExpectAnswersToMatch(column_list=["answer_type", "answer", "source_answer"], ignore_row_if="never"),
            )
        )
    else:
        for column in TEXT_FIELDS:
            expectations.append(
                _named("protected_spans_restored", ExpectProtectedSpansRestored(column_list=[f"en_{column}", column]))
            )
    return validate(frame, expectations, stage, run)


def check_normalized(
    records: Sequence[Problem],
    english: Sequence[Problem],
    *,
    lang: str,
    rules: Sequence[str],
    stage: str,
    run: StageRun | None = None,
) -> list[CheckOutcome]:
    dataset = english[0].dataset if english else (records[0].dataset if records else "")
    frame = problem_frame(records, english)
    expectations = common_expectations(dataset, lang) + aligned_expectations(
        [p.id for p in english], lang, exact_answers=False
    )
    if lang == "ja" and "halfwidth_digits" in rules:
        expectations.append(
            _named(
                "no_fullwidth_digits",
                gx.expectations.ExpectColumnValuesToNotMatchRegex(column="text", regex="[０-９]"),
            )
        )
    return validate(frame, expectations, stage, run)
