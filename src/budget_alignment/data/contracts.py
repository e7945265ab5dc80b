"""Data contracts of the data stages: which great-expectations suite each stage's records must pass.

Each stage instance validates each language's records as a pandas frame (one row a record, with the English
original's fields beside each translated one); the rules are in expectations.py, the run and the quarantine in
validation.py. Records that fail a row-level check are rejected: they go to
`reports/data_quality/rejected/{stage}/{lang}.jsonl` with the checks they failed, and downstream never sees them.
A stage fails, writing nothing, when a table-level check fails or when it rejects more than
`contracts.max_rejected_fraction.{kind}` of its records (quarantine.py).

Every expectation carries `meta.check`, the name of the rule it enforces (`ids_unique`, `answer_unchanged`, ...):
reports, rejected files and tests refer to checks by that name. `CHECKS` lists them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import great_expectations as gx
import pandas as pd

from budget_alignment.data.expectations import (
    CHECKS,
    ExpectAnswersToMatch,
    ExpectChoicesConsistentWithAnswer,
    ExpectColumnValuesToBeInLanguage,
    ExpectColumnValuesToHaveNoTranslationMarkers,
    ExpectDelimitersBalanceKept,
    ExpectProtectedSpansRestored,
    choices_text,
    length_ratio,
)
from budget_alignment.data.validation import ALIGNMENT_CHECK, ContractOutcome, ContractViolation, validate
from budget_alignment.records import Problem

if TYPE_CHECKING:
    from budget_alignment.params import TranslationParams
    from budget_alignment.tracking import StageRun

__all__ = ["CHECKS", "ContractOutcome", "ContractViolation", "check_ingested", "check_normalized", "check_translated"]


# --- the frame -----------------------------------------------------------------------------------------------------

TEXT_FIELDS = ("question", "choices_text", "solution")
COLUMNS = (
    "id",
    "dataset",
    "lang",
    "question",
    "answer",
    "answer_type",
    "choice_letters",
    "choice_count",
    "choices_text",
    "solution",
    "text",
    "source_answer",
)
ALIGNED_COLUMNS = ("en_answer", "en_choice_count", "en_question", "en_choices_text", "en_solution", "length_ratio")


def problem_frame(records: Sequence[Problem], english: Sequence[Problem] | None = None) -> pd.DataFrame:
    """One row a record; with `english`, the English original's fields beside each (`en_*`, null when missing)."""
    originals = {problem.id: problem for problem in english or []}
    rows = []
    for problem in records:
        choices = choices_text(problem)
        translation = problem.provenance.get("translation")
        row: dict[str, Any] = {
            "id": problem.id,
            "dataset": problem.dataset,
            "lang": problem.lang,
            "question": problem.question,
            "answer": problem.answer,
            "answer_type": problem.answer_type,
            "choice_letters": "".join(problem.choices or {}),
            "choice_count": len(problem.choices or {}),
            "choices_text": choices,
            "solution": problem.solution,
            "text": "\n".join(t for t in (problem.question, choices, problem.solution) if t),
            "source_answer": translation.get("source_answer") if isinstance(translation, Mapping) else None,
        }
        original = originals.get(problem.id)
        if english is not None:
            row.update(
                {
                    "en_answer": original.answer if original else None,
                    "en_choice_count": len(original.choices or {}) if original else None,
                    "en_question": original.question if original else None,
                    "en_choices_text": choices_text(original) if original else None,
                    "en_solution": original.solution if original else None,
                    "length_ratio": length_ratio(problem, original),
                }
            )
        rows.append(row)
    columns = [*COLUMNS, *(ALIGNED_COLUMNS if english is not None else ())]
    # No records (all of them quarantined upstream): the same columns, so every expectation judges zero rows.
    frame = pd.DataFrame(rows, columns=columns)
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


def aligned_expectations(expected_ids: Sequence[str], lang: str, *, exact_answers: bool) -> list:
    """Checks of records against their English originals (translate and normalize stages)."""
    E = gx.expectations
    expectations = [
        _named(ALIGNMENT_CHECK, E.ExpectColumnDistinctValuesToEqualSet(column="id", value_set=list(expected_ids))),
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


# --- the stages' contracts ------------------------------------------------------------------------------------------


def check_ingested(
    records: Sequence[Problem],
    *,
    dataset: str,
    stage: str,
    max_rejected_fraction: float = 0.0,
    run: StageRun | None = None,
) -> ContractOutcome:
    return validate(
        problem_frame(records),
        common_expectations(dataset, "en"),
        stage,
        "en",
        max_rejected_fraction=max_rejected_fraction,
        run=run,
    )


def check_translated(
    records: Sequence[Problem],
    english: Sequence[Problem],
    *,
    lang: str,
    entry: TranslationParams,
    stage: str,
    max_rejected_fraction: float = 0.0,
    prior: Mapping[str, Sequence[str]] | None = None,
    run: StageRun | None = None,
) -> ContractOutcome:
    dataset = english[0].dataset if english else (records[0].dataset if records else "")
    expected_ids = [p.id for p in english]
    expectations = common_expectations(dataset, lang) + aligned_expectations(expected_ids, lang, exact_answers=True)
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
    return validate(
        problem_frame(records, english),
        expectations,
        stage,
        lang,
        max_rejected_fraction=max_rejected_fraction,
        expected_ids=expected_ids,
        prior=prior,
        run=run,
    )


def check_normalized(
    records: Sequence[Problem],
    english: Sequence[Problem],
    *,
    lang: str,
    rules: Sequence[str],
    stage: str,
    expected_ids: Sequence[str],
    max_rejected_fraction: float = 0.0,
    run: StageRun | None = None,
) -> ContractOutcome:
    """`expected_ids`: what the stage was given (what ingest or translate accepted)."""
    dataset = english[0].dataset if english else (records[0].dataset if records else "")
    expectations = common_expectations(dataset, lang) + aligned_expectations(expected_ids, lang, exact_answers=False)
    if lang == "ja" and "halfwidth_digits" in rules:
        expectations.append(
            _named(
                "no_fullwidth_digits",
                gx.expectations.ExpectColumnValuesToNotMatchRegex(column="text", regex="[０-９]"),
            )
        )
    return validate(
        problem_frame(records, english),
        expectations,
        stage,
        lang,
        max_rejected_fraction=max_rejected_fraction,
        expected_ids=expected_ids,
        run=run,
    )
