"""A local mirror of every hub dataset the paper profile reads, in the hub's own formats (for `hub_mirror`).

`write_hub_mirror(folder, limit=None)` writes, under `folder/<repo_id>`, what `huggingface-cli download --repo-type
dataset REPO --local-dir folder/REPO` would: a README.md whose YAML header declares the `configs` and their data
files, and the data files in the repository's layout, with each set's real column names and types. The rows come
from the project's own bundled sets (same ids and answers in en/ja/fr/es; see src/budget_alignment/data/bundled/),
standing in for the paper's sets:

    GAIR/LIMO (train): chains; question, solution, answer (limo.jsonl)
    HuggingFaceH4/MATH-500 (test): math, then the MATH-500 extract of tests/fixtures; problem, solution, answer,
        subject, level, unique_id (test.jsonl)
    cais/mmlu college_mathematics, professional_medicine (test): college_math, medicine; question, subject,
        choices, answer as an int (parquet per config)
    openai/MMMLU JA_JP, FR_FR, ES_LA (test): the same, translated; an unnamed index column, Question, A, B, C, D,
        Answer, Subject (test/mmlu_JA-JP.csv, ...)
    shanchen/aime_2025_multilingual (en, ja, fr, es): competition_math; id, problem, answer as an int
    shanchen/gpqa_diamond_mc_multilingual (en, ja, fr, es): science; problem (the choices A-D at its end),
        solution like \\boxed{C}, domain

Medicine's bundled items have ten choices (MMLU-Pro's shape); MMLU and MMMLU have four, so each item keeps its answer
and the first three other choices, the same in every language. MMMLU also gets two rows of another subject, so the
`Subject` filter has something to leave out. `limit` keeps the first rows of each split.

Importable by tests: `from hub_mirror import write_hub_mirror`.
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import FIXTURES

LANGS = ("en", "ja", "fr", "es")
MMMLU_CONFIGS = {"ja": ("JA_JP", "JA-JP"), "fr": ("FR_FR", "FR-FR"), "es": ("ES_LA", "ES-LA")}
LETTERS = "ABCD"

# The repositories and the (config, split) pairs the paper profile reads from each.
PAPER_HUB_DATASETS = {
    "GAIR/LIMO": [(None, "train")],
    "HuggingFaceH4/MATH-500": [(None, "test")],
    "cais/mmlu": [("college_mathematics", "test"), ("professional_medicine", "test")],
    "openai/MMMLU": [(config, "test") for config, _ in MMMLU_CONFIGS.values()],
    "shanchen/aime_2025_multilingual": [(None, lang) for lang in LANGS],
    "shanchen/gpqa_diamond_mc_multilingual": [(None, lang) for lang in LANGS],
}


def bundled(name: str, lang: str) -> list[dict[str, Any]]:
    text = resources.files("budget_alignment.data").joinpath("bundled", name, f"{lang}.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def four_choices(row: dict[str, Any], english: dict[str, Any]) -> tuple[list[str], int]:
    """The item's choices cut to four: the answer and the first three others (chosen on the English item)."""
    letters = list(english["choices"])
    kept = sorted(
        [letters.index(english["answer"]), *[i for i, letter in enumerate(letters) if letter != english["answer"]][:3]]
    )
    texts = list(row["choices"].values())
    return [texts[i] for i in kept], kept.index(letters.index(english["answer"]))


def _card(configs: list[tuple[str, list[tuple[str, str]]]]) -> str:
    lines = ["---", "configs:"]
    for name, files in configs:
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, path in files:
            lines += [f"  - split: {split}", f"    path: {path}"]
    return "\n".join([*lines, "---", "", "A local copy for tests, in the hub repository's layout.", ""])


def _parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _repo(folder: Path, repo_id: str, configs: list[tuple[str, list[tuple[str, str]]]]) -> Path:
    repo = folder / repo_id
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "README.md").write_text(_card(configs), encoding="utf-8")
    return repo


def write_limo(folder: Path, limit: int | None = None) -> None:
    repo = _repo(folder, "GAIR/LIMO", [("default", [("train", "limo.jsonl")])])
    rows = [
        {"question": r["question"], "solution": r["solution"], "answer": r["answer"]} for r in bundled("chains", "en")
    ]
    _jsonl(repo / "limo.jsonl", rows[:limit])


def write_math500(folder: Path, limit: int | None = None) -> None:
    repo = _repo(folder, "HuggingFaceH4/MATH-500", [("default", [("test", "test.jsonl")])])
    rows = [
        {
            "problem": r["question"],
            "solution": f"The answer is $\\boxed{{{r['answer']}}}$.",
            "answer": r["answer"],
            "subject": "Prealgebra",
            "level": 1,
            "unique_id": f"test/prealgebra/{r['id']}.json",
        }
        for r in bundled("math", "en")
    ]
    real = (FIXTURES / "math500" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    rows += [json.loads(line) for line in real]
    _jsonl(repo / "test.jsonl", rows[:limit])


MMLU_SCHEMA = pa.schema(
    [("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.int64())]
)
SUBJECTS = {"college_mathematics": "college_math", "professional_medicine": "medicine"}


def _mmlu_rows(subject: str, lang: str) -> list[dict[str, Any]]:
    name = SUBJECTS[subject]
    rows = []
    for row, english in zip(bundled(name, lang), bundled(name, "en"), strict=True):
        choices, answer = four_choices(row, english)
        rows.append({"question": row["question"], "subject": subject, "choices": choices, "answer": answer})
    return rows


def write_mmlu(folder: Path, limit: int | None = None) -> None:
    configs = [(subject, [("test", f"{subject}/test-00000-of-00001.parquet")]) for subject in SUBJECTS]
    repo = _repo(folder, "cais/mmlu", configs)
    for subject in SUBJECTS:
        _parquet(repo / subject / "test-00000-of-00001.parquet", _mmlu_rows(subject, "en")[:limit], MMLU_SCHEMA)


def write_mmmlu(folder: Path, limit: int | None = None) -> None:
    configs = [(config, [("test", f"test/mmlu_{suffix}.csv")]) for config, suffix in MMMLU_CONFIGS.values()]
    repo = _repo(folder, "openai/MMMLU", configs)
    for lang, (_, suffix) in MMMLU_CONFIGS.items():
        rows = [
            {"Question": f"({lang}) 2 + 2 = ?", "A": "3", "B": "4", "C": "5", "D": "6", "Answer": "B"},
            {"Question": f"({lang}) 3 x 3 = ?", "A": "6", "B": "8", "C": "9", "D": "12", "Answer": "C"},
        ]
        rows = [{**row, "Subject": "abstract_algebra"} for row in rows]
        for subject in SUBJECTS:
            for row in _mmlu_rows(subject, lang)[:limit]:
                letters = dict(zip(LETTERS, row["choices"], strict=True))
                rows.append(
                    {"Question": row["question"], **letters, "Answer": LETTERS[row["answer"]], "Subject": subject}
                )
        path = repo / "test" / f"mmlu_{suffix}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="") as handle:
            # MMMLU's files start with an unnamed index column.
            writer = csv.writer(handle)
            writer.writerow(["", "Question", "A", "B", "C", "D", "Answer", "Subject"])
            for index, row in enumerate(rows):
                writer.writerow([index, *(row[key] for key in ("Question", "A", "B", "C", "D", "Answer", "Subject"))])


def write_aime(folder: Path, limit: int | None = None) -> None:
    repo = _repo(
        folder,
        "shanchen/aime_2025_multilingual",
        [("default", [(lang, f"data/{lang}-00000-of-00001.parquet") for lang in LANGS])],
    )
    schema = pa.schema([("id", pa.int64()), ("problem", pa.string()), ("answer", pa.int64())])
    for lang in LANGS:
        rows = [
            {"id": index, "problem": row["question"], "answer": int(row["answer"])}
            for index, row in enumerate(bundled("competition_math", lang))
        ]
        _parquet(repo / "data" / f"{lang}-00000-of-00001.parquet", rows[:limit], schema)


def write_gpqa(folder: Path, limit: int | None = None) -> None:
    repo = _repo(
        folder,
        "shanchen/gpqa_diamond_mc_multilingual",
        [("default", [(lang, f"data/{lang}-00000-of-00001.parquet") for lang in LANGS])],
    )
    schema = pa.schema([("problem", pa.string()), ("solution", pa.string()), ("domain", pa.string())])
    for lang in LANGS:
        rows = []
        for row in bundled("science", lang):
            listed = "\n".join(f"{letter}) {text}" for letter, text in row["choices"].items())
            rows.append(
                {
                    "problem": f"{row['question']}\n\n{listed}",
                    "solution": f"\\boxed{{{row['answer']}}}",
                    "domain": "Physics",
                }
            )
        _parquet(repo / "data" / f"{lang}-00000-of-00001.parquet", rows[:limit], schema)


def write_hub_mirror(folder: str | Path, limit: int | None = None) -> Path:
    """Every hub dataset the paper profile reads, under `folder/<repo_id>`; returns `folder`."""
    folder = Path(folder)
    for write in (write_limo, write_math500, write_mmlu, write_mmmlu, write_aime, write_gpqa):
        write(folder, limit)
    return folder
