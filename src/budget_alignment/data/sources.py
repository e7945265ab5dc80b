"""Data sources into `Problem` records: the hub at a pinned revision, a local file, or the bundled sample sets.

A source yields raw rows (dicts); `filters` keep some of them; a loader, found by name in `LOADERS`, maps each
remaining row to the fields of a `Problem`. Choices become letters with texts (`{"A": "...", ...}`) and gold
answers become strings. Errors name the source (file or repository), the row and the field.

The hub is reached in one place, `fetch_hub_dataset`, which tests replace with a reader of hub-format fixtures.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from budget_alignment import paths
from budget_alignment.fingerprints import sha256_file, tree_digest
from budget_alignment.hub import warn_if_unpinned
from budget_alignment.params import BundledSource, DataSource, HubDatasetSource, LocalSource, Params
from budget_alignment.records import CHOICE_LETTERS, Problem, write_records

if TYPE_CHECKING:
    from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


class SourceError(ValueError):
    """A source that cannot be read or mapped; the message names the source, the row and the field."""


# --- raw rows ------------------------------------------------------------------------------------------------------


@dataclass
class RawRows:
    """Rows as the source holds them, where they came from (for errors) and their provenance (for records)."""

    rows: list[dict[Any, Any]]
    where: str
    provenance: dict[str, Any] = field(default_factory=dict)


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf_disk"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; set `format` "
            f"({', '.join([*SUFFIX_FORMATS.values(), 'hf_disk'])})"
        )
    return fmt


def _read_jsonl(path: Path) -> list[dict[Any, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SourceError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[Any, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise SourceError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    # A list of objects, or an object wrapping exactly one such list ({"data": [...]}, {"test": [...]}).
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise SourceError(f"{path}: expected a list of objects, or an object holding exactly one such list")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise SourceError(f"{path}: expected a list of objects")
    return data


def _read_delimited(path: Path, delimiter: str, header: bool) -> list[dict[Any, Any]]:
    # utf-8-sig drops a byte-order mark (JMMLU's files start with one), else it would stick to the first column.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if header:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = []
            for row in reader:
                if None in row:
                    raise SourceError(f"{path}:{reader.line_num}: more cells than header columns")
                rows.append(dict(row))
            return rows
        # Headerless: columns are addressed by index, as `fields: {question: 0, ...}` does.
        return [dict(enumerate(cells)) for cells in csv.reader(handle, delimiter=delimiter) if cells]


def _read_parquet(path: Path) -> list[dict[Any, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise SourceError(f"{path}: not a readable parquet file: {error}") from None


def _read_hf_disk(path: Path, split: str | None) -> list[dict[Any, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise SourceError(f"{path}: not a `save_to_disk` dataset folder: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise SourceError(f"{path}: a DatasetDict; set `split` to one of {list(loaded)}")
        if split not in loaded:
            raise SourceError(f"{path}: no split {split!r} (splits: {list(loaded)})")
        loaded = loaded[split]
    return loaded.to_list()


def read_local(source: LocalSource) -> RawRows:
    path = Path(source.path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    fmt = detect_format(path) if source.format == "auto" else source.format
    if fmt == "jsonl":
        rows = _read_jsonl(path)
    elif fmt == "json":
        rows = _read_json(path)
    elif fmt in ("csv", "tsv"):
        rows = _read_delimited(path, "," if fmt == "csv" else "\t", source.header)
    elif fmt == "parquet":
        rows = _read_parquet(path)
    else:
        rows = _read_hf_disk(path, source.split)
    digest = tree_digest(path, contents=True) if path.is_dir() else sha256_file(path)
    return RawRows(rows, str(path), {"source": "local", "path": str(path), "format": fmt, "sha256": digest})


def resolve_hub_commit(repo_id: str, revision: str) -> str | None:
    """The commit a revision points to, or None where the hub cannot be asked (offline)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo_id, revision=revision).sha
    except Exception as error:  # offline, gated, rate-limited: the data may still load from the local cache
        log.warning(
            "could not resolve %s@%s to a commit (%s); provenance keeps the revision only", repo_id, revision, error
        )
        return None


def fetch_hub_dataset(source: HubDatasetSource) -> tuple[Any, str | None]:
    """The one call to the hub: (the split as a `datasets.Dataset`, the resolved commit or None)."""
    import datasets

    commit = resolve_hub_commit(source.repo_id, source.revision)
    # Load at the resolved commit, so the rows are exactly the ones the provenance names.
    dataset = datasets.load_dataset(
        source.repo_id, source.config, split=source.split, revision=commit or source.revision
    )
    return dataset, commit


def read_hub(source: HubDatasetSource) -> RawRows:
    where = f"hub {source.repo_id}@{source.revision}" + (f" config {source.config}" if source.config else "")
    where += f" split {source.split}"
    warn_if_unpinned(f"dataset {source.repo_id}", source.revision)
    try:
        dataset, commit = fetch_hub_dataset(source)
    except SourceError:
        raise
    except Exception as error:  # datasets/hub errors have many types; the message is what the user needs
        raise SourceError(f"{where}: cannot load: {type(error).__name__}: {error}") from None
    provenance = {
        "source": "hub",
        "repo_id": source.repo_id,
        "revision": source.revision,
        "resolved_commit": commit,
        "config": source.config,
        "split": source.split,
    }
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    return RawRows(rows, where, provenance)


def bundled_sets() -> list[str]:
    root = resources.files("budget_alignment.data").joinpath("bundled")
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def read_bundled(source: BundledSource, lang: str) -> RawRows:
    lang = source.lang or lang
    entry = resources.files("budget_alignment.data").joinpath("bundled", source.name, f"{lang}.jsonl")
    if not entry.is_file():
        if source.name not in bundled_sets():
            raise SourceError(f"bundled set {source.name!r} does not exist (sets: {', '.join(bundled_sets())})")
        raise SourceError(f"bundled set {source.name!r} has no {lang!r} file")
    with resources.as_file(entry) as path:
        rows = _read_jsonl(path)
        digest = sha256_file(path)
    where = f"bundled/{source.name}/{lang}.jsonl"
    return RawRows(rows, where, {"source": "bundled", "set": source.name, "lang": lang, "sha256": digest})


def apply_filters(raw: RawRows, filters: Mapping[str, Any]) -> RawRows:
    """Keep rows whose column equals the filter value (or is in the list given as value)."""
    if not filters:
        return raw
    columns = set().union(*(row.keys() for row in raw.rows)) if raw.rows else set()
    kept = raw.rows
    for column, wanted in filters.items():
        key: Any = column
        if column not in columns and str(column).isdigit() and int(column) in columns:
            key = int(column)
        elif column not in columns:
            raise SourceError(
                f"{raw.where}: filter column {column!r} is not a column ({', '.join(map(str, columns))})"
            )
        values = wanted if isinstance(wanted, list) else [wanted]
        accepted = {str(value) for value in values}
        kept = [row for row in kept if str(row.get(key)) in accepted]
    if not kept:
        raise SourceError(f"{raw.where}: no row passes the filters {dict(filters)}")
    return RawRows(kept, raw.where, {**raw.provenance, "filters": dict(filters)})


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


def load_source(source: DataSource, dataset: str, lang: str) -> list[Problem]:
    """Every record of a source as `Problem`s of `dataset` in `lang`."""
    if isinstance(source, BundledSource):
        raw = read_bundled(source, lang)
        return map_rows(raw, "bundled", LoadContext(dataset, source.lang or lang, raw.where))
    if isinstance(source, HubDatasetSource):
        raw = apply_filters(read_hub(source), source.filters)
        return map_rows(raw, source.loader, LoadContext(dataset, lang, raw.where))
    raw = apply_filters(read_local(source), source.filters)
    return map_rows(raw, source.loader, LoadContext(dataset, lang, raw.where, source.fields, source.answer_type))


def check_unique_ids(problems: Iterable[Problem], where: str) -> None:
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise SourceError(f"{where}: id {problem.id!r} occurs more than once; map a unique `id` column")
        seen.add(problem.id)


# --- the ingest stage ----------------------------------------------------------------------------------------------


def ingest_dataset(params: Params, dataset: str, run: StageRun | None = None) -> list[Problem]:
    """Stage `ingest@{dataset}`: the English records, validated, to `paths.ingested(dataset)`.

    The same records also go to `paths.translated(dataset, "en")`: English is its own translation, so every
    `normalize@{dataset}-{lang}` stage, English included, reads a translated file.
    """
    from budget_alignment.data import contracts

    if dataset not in params.datasets:
        raise SourceError(f"dataset {dataset!r} is not in params (datasets: {', '.join(params.datasets)})")
    spec = params.datasets[dataset]
    problems = load_source(spec.source, dataset, "en")
    if spec.limit is not None:
        problems = problems[: spec.limit]
    log.info("ingest %s: %d English records", dataset, len(problems))
    contracts.check_ingested(problems, dataset=dataset, stage=f"ingest@{dataset}", run=run)
    for path in (paths.ingested(dataset), paths.translated(dataset, "en")):
        write_records(path, problems)
        if run is not None:
            run.add_output(path)
    if run is not None:
        run.log_metrics({"records": len(problems)})
    return problems
