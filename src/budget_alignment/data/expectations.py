"""The rules of the data contracts: plain row-level functions, and the great-expectations classes that run them.

Each rule has a name (`CHECKS`), the `check` that reports, rejected-record files and tests refer to. The functions
are the rules themselves, so translation (which retries a record that fails them) and the contracts
(contracts.py, which run them as expectations) judge a record alike.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import cache
from typing import Any, ClassVar

import pandas as pd
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation, MulticolumnMapExpectation
from great_expectations.expectations.metrics import ColumnMapMetricProvider, column_condition_partial
from great_expectations.expectations.metrics.map_metric_provider import MulticolumnMapMetricProvider
from great_expectations.expectations.metrics.map_metric_provider.multicolumn_condition_partial import (
    multicolumn_condition_partial,
)

from budget_alignment.data.spans import protected_spans
from budget_alignment.records import CHOICE_LETTERS, Problem

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


# --- row-level rules (plain functions, so they are tested and reused outside great-expectations) -------------------

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


def delimiters_kept(english: str | None, text: str | None) -> bool:
    """`{}` and `$` balanced in the text wherever they are balanced in the English text."""
    if text is None:
        return True
    wanted = delimiters_ok(english) if english else (True, True)
    found = delimiters_ok(text)
    return all(f or not w for w, f in zip(wanted, found, strict=True))


def answers_match(answer_type: str, reference: Any, answer: Any) -> bool:
    """The same answer as a value: a letter for a choice problem, `canonical_answer` for a math one."""
    if answer is None or reference is None:
        return answer is None and reference is None
    if answer_type == "choice":
        return str(answer).strip().upper() == str(reference).strip().upper()
    return canonical_answer(str(answer)) == canonical_answer(str(reference))


def choices_text(problem: Problem) -> str | None:
    """A problem's choices as one text (`A. ...` a line), as the contracts check them."""
    if not problem.choices:
        return None
    return "\n".join(f"{letter}. {text}" for letter, text in problem.choices.items())


def text_length(problem: Problem) -> int:
    return len(problem.question) + len(choices_text(problem) or "") + len(problem.solution or "")


# Short texts say little about a translation's completeness: their ratio is not checked.
MIN_LENGTH_FOR_RATIO = 40


def length_ratio(problem: Problem, original: Problem | None) -> float | None:
    """Translated / English characters over the record's texts; None where the English text is too short."""
    english_length = text_length(original) if original else 0
    return text_length(problem) / english_length if english_length >= MIN_LENGTH_FOR_RATIO else None


def translation_failures(
    record: Problem, original: Problem, *, min_length_ratio: float, max_length_ratio: float
) -> list[str]:
    """The row checks of the translate contract that a machine translation can fix by asking again."""
    failures = []
    pairs = [
        (original.question, record.question),
        (choices_text(original), choices_text(record)),
        (original.solution, record.solution),
    ]
    if not all(spans_restored(english, text) for english, text in pairs):
        failures.append("protected_spans_restored")
    if not (in_language(record.question, record.lang) and in_language(record.solution, record.lang)):
        failures.append("in_target_language")
    ratio = length_ratio(record, original)
    if ratio is not None and not min_length_ratio <= ratio <= max_length_ratio:
        failures.append("length_ratio")
    return failures


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
        return pd.Series([delimiters_kept(en, text) for en, text in _rows(column_list)], index=column_list.index)


class ExpectDelimitersBalanceKept(MulticolumnMapExpectation):
    """Expect `{}` and `$` balanced in the text (second column) wherever they are in the English text (first)."""

    map_metric: ClassVar[str] = "multicolumn_values.delimiters_kept"
    success_keys: ClassVar[tuple[str, ...]] = ("mostly",)


class MulticolumnAnswersMatch(MulticolumnMapMetricProvider):
    condition_metric_name = "multicolumn_values.answers_match"
    condition_domain_keys = _MULTICOLUMN_DOMAIN

    @multicolumn_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_list, **kwargs):
        return pd.Series([answers_match(*row) for row in _rows(column_list)], index=column_list.index)


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
