"""Loaders: one source's rows (dicts) into the fields of `Problem` records, found by name in `LOADERS`.

Each loader knows one layout: the project's bundled sets, a `fields` mapping of columns, or a hub dataset's own
columns (LIMO, MATH-500, MMLU, MMMLU, MMLU-Pro, the XReasoning AIME and GPQA sets). Choices become letters with texts
(`{"A": "...", ...}`) and gold answers become strings. Errors name the source, the row and the field.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from budget_alignment.errors import StageError
from budget_alignment.records import CHOICE_LETTERS, Problem


class SourceError(StageError, ValueError):
    """A source that cannot be read or mapped; the message names the source, the row and the field."""


@dataclass
class RawRows:
    """Rows as the source holds them, where they came from (for errors) and their provenance (for records)."""

    rows: list[dict[Any, Any]]
    where: str
    provenance: dict[str, Any] = field(default_factory=dict)


# --- mapping rows to problems --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadContext:
    dataset: str
    lang: str
    where: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    answer_type: str | None = None


class RowError(ValueError):
    """Raised by a loader for one row; `field` names the column or Problem field at fault."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


Loader = Callable[[Mapping[Any, Any], int, LoadContext], dict[str, Any]]
LOADERS: dict[str, Loader] = {}


def loader(name: str) -> Callable[[Loader], Loader]:
    """Register a loader: `(row, index after filters, context) -> Problem fields`."""

    def register(function: Loader) -> Loader:
        LOADERS[name] = function
        return function

    return register


def column(row: Mapping[Any, Any], name: Any, *alternatives: Any) -> Any:
    for key in (name, *alternatives):
        if key in row and row[key] is not None:
            return row[key]
    raise RowError(str(name), f"no column {name!r} (columns: {', '.join(map(str, row))})")


def answer_string(value: Any, field_name: str = "answer") -> str:
    """Gold answers are strings: 42 -> "42", 18.0 -> "18", 2.5 -> "2.5"."""
    if isinstance(value, bool) or value is None:
        raise RowError(field_name, f"not an answer: {value!r}")
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if not text:
        raise RowError(field_name, "empty answer")
    return text


def choices_from(value: Any, field_name: str = "choices") -> dict[str, str]:
    """A list of texts, or a mapping with letters as keys, -> {"A": text, "B": text, ...}."""
    if hasattr(value, "tolist"):  # numpy arrays from parquet readers
        value = value.tolist()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(field_name, f"expected a list of choices, got the text {value[:60]!r}") from None
    if isinstance(value, Mapping):
        keys = [str(k).strip().upper() for k in value]
        if sorted(keys) != list(CHOICE_LETTERS[: len(keys)]):
            raise RowError(field_name, f"choice keys must be the letters A, B, C, ... got {list(value)}")
        items = sorted(zip(keys, value.values(), strict=True))
        texts = [text for _, text in items]
    elif isinstance(value, list | tuple):
        texts = list(value)
    else:
        raise RowError(field_name, f"expected a list or mapping of choices, got {type(value).__name__}")
    if not 2 <= len(texts) <= len(CHOICE_LETTERS):
        raise RowError(field_name, f"{len(texts)} choices; between 2 and {len(CHOICE_LETTERS)} are supported")
    return {CHOICE_LETTERS[i]: str(text).strip() for i, text in enumerate(texts)}


_LETTER_FORMS = re.compile(r"^\s*(?:\\boxed\{\s*)?\(?\s*([A-J])\s*[).:]?\s*\}?\s*$")


def choice_answer(value: Any, choices: Mapping[str, str], field_name: str = "answer") -> str:
    """The gold letter from a letter ("B", "(B)", "\\boxed{B}"), a 0-based index, or the text of a choice."""
    if isinstance(value, bool) or value is None:
        raise RowError(field_name, f"not an answer: {value!r}")
    if isinstance(value, int | float) and float(value).is_integer():
        index = int(value)
        if not 0 <= index < len(choices):
            raise RowError(field_name, f"answer index {index} is outside the {len(choices)} choices")
        return CHOICE_LETTERS[index]
    text = str(value).strip()
    match = _LETTER_FORMS.match(text)
    if match and match.group(1) in choices:
        return match.group(1)
    if text.isdigit():
        return choice_answer(int(text), choices, field_name)
    for letter, choice in choices.items():
        if choice == text:
            return letter
    raise RowError(
        field_name, f"answer {text[:60]!r} is neither a letter of {list(choices)}, an index, nor a choice text"
    )


def _problem_fields(
    *,
    id: Any,
    question: Any,
    answer: Any,
    choices: Mapping[str, str] | None = None,
    solution: Any = None,
    answer_type: str | None = None,
    **provenance: Any,
) -> dict[str, Any]:
    answer_type = answer_type or ("choice" if choices else "math")
    return {
        "id": str(id).strip(),
        "question": str(question).strip() if question is not None else "",
        "answer": choice_answer(answer, choices) if answer_type == "choice" and choices else answer_string(answer),
        "answer_type": answer_type,
        "choices": dict(choices) if answer_type == "choice" and choices else None,
        "solution": str(solution).strip() if solution not in (None, "") else None,
        "provenance": {k: v for k, v in provenance.items() if v is not None},
    }


@loader("fields")
def load_fields(row: Mapping[Any, Any], index: int, ctx: LoadContext) -> dict[str, Any]:
    """Columns named in `fields`: question and answer required; id, choices, solution optional."""
    mapping = dict(ctx.fields)
    for required in ("question", "answer"):
        if required not in mapping:
            raise RowError(required, f"`fields` must map {required!r} to a column (fields: {mapping})")
    unknown = set(mapping) - {"id", "question", "answer", "choices", "solution"}
    if unknown:
        raise RowError(
            sorted(unknown)[0], f"`fields` may map id, question, answer, choices, solution; not {sorted(unknown)}"
        )
    choices = None
    if "choices" in mapping:
        spec = mapping["choices"]
        if isinstance(spec, list):
            choices = choices_from([column(row, c) for c in spec], "choices")
        else:
            choices = choices_from(column(row, spec), str(spec))
    answer_type = ctx.answer_type or ("choice" if choices else "math")
    if answer_type == "choice" and not choices:
        raise RowError("choices", "answer_type is `choice` but `fields` maps no `choices`")
    raw_answer = column(row, mapping["answer"])
    try:
        answer = choice_answer(raw_answer, choices) if answer_type == "choice" else answer_string(raw_answer)
    except RowError as error:
        raise RowError(str(mapping["answer"]), str(error)) from None
    return _problem_fields(
        id=column(row, mapping["id"]) if "id" in mapping else f"{ctx.dataset}-{index:05d}",
        question=column(row, mapping["question"]),
        answer=answer,
        answer_type=answer_type,
        choices=choices if answer_type == "choice" else None,
        solution=row.get(mapping["solution"]) if "solution" in mapping else None,
    )


@loader("bundled")
def load_bundled(row: Mapping[Any, Any], index: int, ctx: LoadContext) -> dict[str, Any]:
    """The project's own sets: already in the Problem layout."""
    choices = choices_from(row["choices"]) if row.get("choices") else None
    return _problem_fields(
        id=column(row, "id"),
        question=column(row, "question"),
        answer=column(row, "answer"),
        answer_type=column(row, "answer_type"),
        choices=choices,
        solution=row.get("solution"),
    )


@loader("limo")
def load_limo(row: Mapping[Any, Any], index: int, ctx: LoadContext) -> dict[str, Any]:
    """GAIR/LIMO: question, solution (a long reasoning chain ending in \\boxed{}), answer."""
    return _problem_fields(
        id=f"{ctx.dataset}-{index:04d}",
        question=column(row, "question"),
        answer=column(row, "answer"),
        solution=column(row, "solution"),
        row=index,
    )


@loader("math500")
def load_math500(row: Mapping[Any, Any], index: int, ctx: LoadContext) -> dict[str, Any]:
    """HuggingFaceH4/MATH-500 (and OpenAI's prm800k test.jsonl): problem, solution, answer, unique_id."""
    return _problem_fields(
        id=column(row, "unique_id"),
        question=column(row, "problem"),
        answer=column(row, "answer"),
        solution=row.get("solution"),
        subject=row.get("subject"),
        level=row.get("level"),
    )


@loader("mmlu")
def load_mmlu(row: Mapping[Any, Any], index: int, ctx: LoadContext) -> dict[str, Any]:
    """cais/mmlu: question, subject, choices (4 texts), answer (0-3). Ids `{subject}-{row within the subject}`."""
    subject = row.get("subject") or "mmlu"
    choices = choices_from(column(row, "choices"))
    return _problem_fields(
        id=f"{subject}-{index:04d}", question=column(row, "question"), answer=column(row, "answer"), choices=choices
    )


@loader("mmmlu")
def load_mmmlu(row: Mapping[Any, Any], index: int, ctx: LoadContext) -> dict[str, Any]:
    """openai/MMMLU: Question, A-D, Answer (a letter), Subject. Ids match `mmlu`'s when filtered to one subject."""
    subject = row.get("Subject") or "mmlu"
    choices = choices_from([column(row, letter) for letter in "ABCD"])
    return _problem_fields(
        id=f"{subject}-{index:04d}", question=column(row, "Question"), answer=column(row, "Answer"), choices=choices
    )


@loader("mmlu_pro")
def load_mmlu_pro(row: Mapping[Any, Any], index: int, ctx: LoadContext) -> dict[str, Any]:
    """TIGER-Lab/MMLU-Pro: question_id, question, options (up to 10), answer (a letter), category, src."""
    choices = choices_from(column(row, "options"), "options")
    return _problem_fields(
        id=f"mmlu_pro-{column(row, 'question_id')}",
        question=column(row, "question"),
        answer=column(row, "answer"),
        choices=choices,
        category=row.get("category"),
        src=row.get("src"),
    )


@loader("xreasoning_aime")
def load_xreasoning_aime(row: Mapping[Any, Any], index: int, ctx: LoadContext) -> dict[str, Any]:
    """shanchen/aime_2025_multilingual: one split per language, `problem` and an integer `answer`, same row order."""
    return _problem_fields(
        id=f"{ctx.dataset}-{index:03d}",
        question=column(row, "problem", "question"),
        answer=column(row, "answer"),
        source_id=row.get("id"),
    )


# Choices written at the end of a GPQA problem, one a line: "A) text", "(A) text", "A. text", "A: text".
_CHOICE_LINE = re.compile(r"^[ \t]*\(?([A-D])[).:][ \t]*(.+?)[ \t]*$", re.MULTILINE)
# Or on one line: "(A) text (B) text (C) text (D) text".
_INLINE_CHOICES = re.compile(r"\(A\)\s*(.+?)\s*\(B\)\s*(.+?)\s*\(C\)\s*(.+?)\s*\(D\)\s*(.+?)\s*$", re.DOTALL)


def split_embedded_choices(text: str) -> tuple[str, dict[str, str]]:
    """(question, choices) of a problem whose text ends with its A-D choices."""
    lines = list(_CHOICE_LINE.finditer(text))
    for start in range(len(lines) - 3):
        block = lines[start : start + 4]
        if [m.group(1) for m in block] == list("ABCD") and not text[block[-1].end() :].strip():
            between = [text[a.end() : b.start()] for a, b in itertools.pairwise(block)]
            if all(not gap.strip() for gap in between):
                return text[: block[0].start()].strip(), {m.group(1): m.group(2) for m in block}
    inline = _INLINE_CHOICES.search(text)
    if inline:
        return text[: inline.start()].strip(), dict(zip("ABCD", inline.groups(), strict=True))
    raise RowError("problem", "cannot find the A-D choices at the end of the problem text")


@loader("xreasoning_gpqa")
def load_xreasoning_gpqa(row: Mapping[Any, Any], index: int, ctx: LoadContext) -> dict[str, Any]:
    """shanchen/gpqa_diamond_mc_multilingual: `problem` ending with choices A-D, `solution` like "\\boxed{D}"."""
    question, choices = split_embedded_choices(str(column(row, "problem", "question")))
    return _problem_fields(
        id=f"{ctx.dataset}-{index:03d}",
        question=question,
        answer=column(row, "solution", "answer"),
        choices=choices,
        domain=row.get("domain"),
    )


def map_rows(raw: RawRows, loader_name: str, ctx: LoadContext) -> list[Problem]:
    """Every row of `raw` as a `Problem`, through the named loader."""
    try:
        function = LOADERS[loader_name]
    except KeyError:
        raise SourceError(f"{raw.where}: no loader {loader_name!r} (loaders: {', '.join(sorted(LOADERS))})") from None
    problems = []
    for index, row in enumerate(raw.rows):
        try:
            fields = function(row, index, ctx)
            fields["provenance"] = {**raw.provenance, **fields["provenance"]}
            problems.append(Problem(dataset=ctx.dataset, lang=ctx.lang, **fields))
        except RowError as error:
            raise SourceError(f"{raw.where}: row {index + 1}, field {error.field!r}: {error}") from None
        except ValidationError as error:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(record)'}: {e['msg']}" for e in error.errors())
            raise SourceError(f"{raw.where}: row {index + 1}: invalid record: {detail}") from None
    return problems
