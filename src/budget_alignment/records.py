"""Schemas of the jsonl records that flow between stages, and their validated reading and writing.

Every stage reads and writes these through `read_records` / `write_records`, so a malformed line is
reported with its file and line number, and an output is never left half-written.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from budget_alignment.errors import StageError
from budget_alignment.io import atomic_write

CHOICE_LETTERS = "ABCDEFGHIJ"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(Record):
    """One question in one language; `id` is stable across languages."""

    id: str
    dataset: str
    lang: str
    question: str
    answer: str
    answer_type: Literal["math", "choice"]
    choices: dict[str, str] | None = None
    solution: str | None = None
    provenance: dict[str, Any] = {}

    @field_validator("id", "question", "answer")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _choices_match_answer(self) -> Problem:
        if self.answer_type == "choice":
            if not self.choices:
                raise ValueError("a choice problem needs `choices`")
            letters = "".join(self.choices)
            if letters != CHOICE_LETTERS[: len(letters)]:
                raise ValueError(f"choices must be lettered A, B, C, ... in order, got {list(self.choices)}")
            if self.answer not in self.choices:
                raise ValueError(f"answer {self.answer!r} is not one of the choices {list(self.choices)}")
        elif self.choices is not None:
            raise ValueError("a math problem has no `choices`")
        return self


class GrpoProblem(Problem):
    """A GRPO prompt: a problem and the domain its rewards judge it in (`grpo.datasets.<name>.domain`)."""

    domain: str

    @field_validator("domain")
    @classmethod
    def _domain_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class Completion(Record):
    """One sampled answer of a model to a problem."""

    problem_id: str
    model: str
    lang: str
    sample: int
    text: str
    tokens: int
    finish_reason: str


class Score(Record):
    """The judgement of one completion."""

    problem_id: str
    sample: int
    extracted: str | None
    correct: bool
    think_in_lang: bool
    answer_in_lang: bool
    following: bool
    format_ok: bool


class RecordError(StageError, ValueError):
    """A record file that cannot be read: names the file, the line and the field."""


class MissingInputError(StageError, FileNotFoundError):
    """A record file a stage reads does not exist (yet): the stage that writes it has not run."""

    def __str__(self) -> str:
        return f"{self.filename}: no such file (run the stage that writes it first)"


R = TypeVar("R", bound=Record)


def iter_records(path: str | Path, model: type[R]) -> Iterator[R]:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(errno.ENOENT, "no such file", str(path))
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield model.model_validate(json.loads(line))
            except json.JSONDecodeError as error:
                raise RecordError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            except ValidationError as error:
                fields = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or '(record)'}: {e['msg']}" for e in error.errors()
                )
                raise RecordError(f"{path}:{line_number}: invalid {model.__name__} record: {fields}") from None


def read_records(path: str | Path, model: type[R]) -> list[R]:
    return list(iter_records(path, model))


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    """Write records as jsonl atomically; returns how many were written."""
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(record.model_dump_json() + "\n")
            count += 1
    return count
