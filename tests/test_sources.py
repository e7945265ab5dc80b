"""Sources and loaders: extracts of real public files (tests/fixtures) through the `local` source, hub-format
fixtures, the bundled sets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from budget_alignment.data import loaders, sources
from budget_alignment.data.loaders import LOADERS, SourceError, split_embedded_choices
from budget_alignment.data.sources import bundled_sets, load_source
from budget_alignment.fingerprints import sha256_file
from budget_alignment.params import BundledSource, HubDatasetSource, LocalSource
from budget_alignment.records import CHOICE_LETTERS
from conftest import FIXTURES

LANGS = ("en", "ja", "fr", "es")


def local(path: Path, **fields) -> LocalSource:
    return LocalSource(kind="local", path=str(path), **fields)


# --- real files (extracts: tests/fixtures/README.md) -----------------------------------------------------------------


def test_math500_jsonl_with_its_loader_and_with_a_field_mapping():
    path = FIXTURES / "math500" / "test.jsonl"
    problems = load_source(local(path, loader="math500"), "math", "en")
    assert len(problems) == 24
    assert problems[0].id == "test/precalculus/807.json"
    assert all(p.answer_type == "math" and p.answer.strip() and p.solution for p in problems)
    assert problems[0].provenance["sha256"] == sha256_file(path)
    assert problems[0].provenance["subject"] == "Precalculus"
    mapped = load_source(
        local(path, fields={"id": "unique_id", "question": "problem", "answer": "answer", "solution": "solution"}),
        "math",
        "en",
    )
    assert [(p.id, p.question, p.answer) for p in mapped] == [(p.id, p.question, p.answer) for p in problems]


MMLU_FIELDS = {"question": 0, "choices": [1, 2, 3, 4], "answer": 5}


def test_mmlu_college_math_headerless_csv():
    path = FIXTURES / "mmlu_college_mathematics" / "college_mathematics_test.csv"
    problems = load_source(local(path, header=False, fields=MMLU_FIELDS), "college_math", "en")
    assert len(problems) == 8
    assert all(p.answer_type == "choice" and list(p.choices) == list("ABCD") for p in problems)
    assert all(p.answer in "ABCD" for p in problems)
    assert problems[0].id == "college_math-00000"
    assert {p.answer for p in problems} == set("ABCD")


def test_jmmlu_csv_with_a_byte_order_mark():
    path = FIXTURES / "jmmlu" / "college_mathematics.csv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    problems = load_source(local(path, header=False, fields=MMLU_FIELDS), "college_math", "ja")
    assert len(problems) == 6
    assert not problems[0].question.startswith("\ufeff")
    assert all(p.lang == "ja" and p.answer in "ABCD" for p in problems)


def test_mmlu_pro_health_from_parquet_with_ten_options():
    path = FIXTURES / "mmlu_pro" / "test-extract.parquet"
    problems = load_source(local(path, loader="mmlu_pro", filters={"category": "health"}), "medicine", "en")
    assert len(problems) == 6
    assert sorted(len(p.choices) for p in problems) == [4, 7, 10, 10, 10, 10]
    ten = [p for p in problems if len(p.choices) == 10]
    assert len(ten) == 4 and all(list(p.choices) == list(CHOICE_LETTERS) for p in ten)
    assert all(p.answer in p.choices for p in problems)
    assert all(p.provenance["category"] == "health" for p in problems)
    assert problems[0].provenance["filters"] == {"category": "health"}
    # The same file through a field mapping: the options column is a list, the answer a letter.
    mapped = load_source(
        local(
            path,
            fields={"id": "question_id", "question": "question", "choices": "options", "answer": "answer_index"},
            filters={"category": "health"},
        ),
        "medicine",
        "en",
    )
    assert [p.answer for p in mapped] == [p.answer for p in problems]


def test_mgsm_tsv_in_four_languages_aligned_by_row():
    loaded = {
        lang: load_source(
            local(FIXTURES / "mgsm" / f"mgsm_{lang}.tsv", header=False, fields={"question": 0, "answer": 1}),
            "mgsm",
            lang,
        )
        for lang in LANGS
    }
    assert all(len(problems) == 6 for problems in loaded.values())
    assert [p.id for p in loaded["ja"]] == [p.id for p in loaded["en"]]
    assert [p.answer for p in loaded["fr"]] == [p.answer for p in loaded["en"]]


def test_polymath_jsonl():
    problems = load_source(
        local(
            FIXTURES / "polymath" / "fr" / "low.jsonl",
            fields={"id": "id", "question": "question", "answer": "answer"},
        ),
        "polymath",
        "fr",
    )
    assert len(problems) == 6
    assert problems[0].id == "low-fr-0"
    assert all(isinstance(p.answer, str) and p.answer for p in problems)


# --- local formats and errors --------------------------------------------------------------------------------------


def test_formats_from_the_suffix(tmp_path):
    rows = [{"q": "What is $1+1$?", "a": 2, "id": "x1"}, {"q": "What is 3 halves?", "a": 1.5, "id": "x2"}]
    fields = {"id": "id", "question": "q", "answer": "a"}
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    (tmp_path / "d.csv").write_text("id,q,a\nx1,What is $1+1$?,2\nx2,What is 3 halves?,1.5\n", encoding="utf-8")
    (tmp_path / "d.tsv").write_text("x1\tWhat is $1+1$?\t2\nx2\tWhat is 3 halves?\t1.5\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    expected = [("x1", "What is $1+1$?", "2"), ("x2", "What is 3 halves?", "1.5")]
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "disk"):
        problems = load_source(local(tmp_path / name, fields=fields), "toy", "en")
        assert [(p.id, p.question, p.answer) for p in problems] == expected, name
    tsv = load_source(
        local(tmp_path / "d.tsv", header=False, fields={"id": 0, "question": 1, "answer": 2}), "toy", "en"
    )
    assert [(p.id, p.question, p.answer) for p in tsv] == expected
    split = load_source(local(tmp_path / "dict", split="test", fields=fields), "toy", "en")
    assert [p.id for p in split] == ["x1", "x2"]
    with pytest.raises(SourceError, match="set `split`"):
        load_source(local(tmp_path / "dict", fields=fields), "toy", "en")


def test_errors_name_the_file_the_row_and_the_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"q": "fine", "a": 1}\n{"q": "broken"\n', encoding="utf-8")
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: not valid JSON"):
        load_source(local(path, fields={"question": "q", "answer": "a"}), "toy", "en")
    path.write_text('{"q": "fine", "a": 1}\n{"q": "no answer"}\n', encoding="utf-8")
    with pytest.raises(SourceError, match=r"bad\.jsonl: row 2, field 'a': no column 'a'"):
        load_source(local(path, fields={"question": "q", "answer": "a"}), "toy", "en")
    path.write_text('{"q": "pick", "a": "E", "c": ["x", "y"]}\n', encoding="utf-8")
    with pytest.raises(SourceError, match=r"row 1, field 'a': answer 'E' is neither a letter"):
        load_source(local(path, fields={"question": "q", "answer": "a", "choices": "c"}), "toy", "en")
    path.write_text('{"q": "   ", "a": "1"}\n', encoding="utf-8")
    with pytest.raises(SourceError, match=r"row 1: invalid record: question: .*must not be empty"):
        load_source(local(path, fields={"question": "q", "answer": "a"}), "toy", "en")
    with pytest.raises(SourceError, match="no loader 'nope'"):
        load_source(local(path, loader="nope"), "toy", "en")
    with pytest.raises(SourceError, match="filter column 'z' is not a column"):
        load_source(local(path, fields={"question": "q", "answer": "a"}, filters={"z": 1}), "toy", "en")
    (tmp_path / "x.xlsx").touch()
    with pytest.raises(SourceError, match="cannot tell the format"):
        load_source(local(tmp_path / "x.xlsx", fields={}), "toy", "en")
    with pytest.raises(SourceError, match="no such file"):
        load_source(local(tmp_path / "missing.jsonl"), "toy", "en")


def test_choice_answers_as_letters_indices_and_texts():
    choices = {"A": "red", "B": "green", "C": "blue"}
    assert loaders.choice_answer("B", choices) == "B"
    assert loaders.choice_answer("(C)", choices) == "C"
    assert loaders.choice_answer("\\boxed{A}", choices) == "A"
    assert loaders.choice_answer(2, choices) == "C"
    assert loaders.choice_answer("1", choices) == "B"
    assert loaders.choice_answer("green", choices) == "B"
    assert loaders.answer_string(18.0) == "18"
    assert loaders.answer_string(2.5) == "2.5"


# --- the bundled sets ----------------------------------------------------------------------------------------------


def test_bundled_sets_exist_in_four_languages_with_the_same_ids():
    assert set(bundled_sets()) >= {"chains", "math", "college_math", "competition_math", "science", "medicine"}
    for name in bundled_sets():
        loaded = {lang: load_source(BundledSource(name=name), name, lang) for lang in LANGS}
        ids = [p.id for p in loaded["en"]]
        assert len(ids) == len(set(ids)) >= 8
        for lang, problems in loaded.items():
            assert [p.id for p in problems] == ids, (name, lang)
            assert [p.answer for p in problems] == [p.answer for p in loaded["en"]], (name, lang)
            assert all(p.lang == lang and p.provenance["source"] == "bundled" for p in problems)
    chains = load_source(BundledSource(name="chains"), "chains", "en")
    assert all("\\boxed{" in p.solution.split("\n\n")[-1] for p in chains)


def test_a_bundled_source_can_name_its_language():
    problems = load_source(BundledSource(name="math", lang="fr"), "math", "ja")
    assert problems[0].lang == "fr"
    with pytest.raises(SourceError, match="does not exist"):
        load_source(BundledSource(name="nosuchset"), "x", "en")


# --- hub-format fixtures -------------------------------------------------------------------------------------------

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_repo(root: Path, repo_id: str, configs: dict[str | None, dict[str, list[dict]]]) -> None:
    """A folder laid out like a hub dataset repository: parquet shards per config and split, configs in README.md."""
    repo = root / repo_id
    card = ["---", "configs:"]
    for config, splits in configs.items():
        name = config or "default"
        folder = repo / (config or "data")
        folder.mkdir(parents=True, exist_ok=True)
        card += [f"- config_name: {name}", "  data_files:"]
        for split, rows in splits.items():
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000-of-00001.parquet")
            card += [f"  - split: {split}", f"    path: {config or 'data'}/{split}-*"]
    card.append("---")
    (repo / "README.md").write_text("\n".join(card) + "\n", encoding="utf-8")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Replace the one hub call by `datasets.load_dataset` on local hub-format folders."""
    root = tmp_path / "hub"
    calls = []

    def fetch(source: HubDatasetSource):
        calls.append(source)
        folder = root / source.repo_id
        if not folder.is_dir():
            raise FileNotFoundError(f"no repository {source.repo_id}")
        return datasets.load_dataset(str(folder), source.config, split=source.split), FAKE_COMMIT

    monkeypatch.setattr(sources, "fetch_hub_dataset", fetch)
    return root, calls


def hub_source(repo_id: str, loader: str, **fields) -> HubDatasetSource:
    return HubDatasetSource(
        kind="hub", repo_id=repo_id, revision=fields.pop("revision", FAKE_COMMIT), loader=loader, **fields
    )


def test_hub_limo_and_math500(hub):
    root, _ = hub
    write_hub_repo(
        root,
        "GAIR/LIMO",
        {None: {"train": [{"question": "What is $2+2$?", "solution": "Add.\n\nSo \\boxed{4}.", "answer": "4"}]}},
    )
    write_hub_repo(
        root,
        "HuggingFaceH4/MATH-500",
        {
            None: {
                "test": [
                    {
                        "problem": "Find $x$.",
                        "solution": "It is $\\boxed{3}$.",
                        "answer": "3",
                        "subject": "Algebra",
                        "level": 1,
                        "unique_id": "test/algebra/1.json",
                    }
                ]
            }
        },
    )
    limo = load_source(hub_source("GAIR/LIMO", "limo", split="train"), "chains", "en")
    assert (limo[0].id, limo[0].answer, limo[0].solution) == ("chains-0000", "4", "Add.\n\nSo \\boxed{4}.")
    assert limo[0].provenance["resolved_commit"] == FAKE_COMMIT
    assert limo[0].provenance["repo_id"] == "GAIR/LIMO"
    math = load_source(hub_source("HuggingFaceH4/MATH-500", "math500"), "math", "en")
    assert math[0].id == "test/algebra/1.json" and math[0].provenance["level"] == 1


def test_hub_mmlu_and_mmmlu_share_ids_when_filtered_to_a_subject(hub):
    root, _ = hub
    english = [
        {"question": f"Q{i}?", "subject": "college_mathematics", "choices": ["1", "2", "3", "4"], "answer": i % 4}
        for i in range(3)
    ]
    write_hub_repo(root, "cais/mmlu", {"college_mathematics": {"test": english}})
    mmmlu = [
        {"Question": f"問{i}?", "A": "1", "B": "2", "C": "3", "D": "4", "Answer": "ABCD"[i % 4], "Subject": subject}
        for subject in ("abstract_algebra", "college_mathematics")
        for i in range(3)
    ]
    write_hub_repo(root, "openai/MMMLU", {"JA_JP": {"test": mmmlu}})
    en = load_source(hub_source("cais/mmlu", "mmlu", config="college_mathematics"), "college_math", "en")
    ja = load_source(
        hub_source("openai/MMMLU", "mmmlu", config="JA_JP", filters={"Subject": "college_mathematics"}),
        "college_math",
        "ja",
    )
    assert [p.id for p in ja] == [p.id for p in en] == [f"college_mathematics-000{i}" for i in range(3)]
    assert [p.answer for p in ja] == [p.answer for p in en] == ["A", "B", "C"]
    assert ja[0].question == "問0?" and ja[0].choices == {"A": "1", "B": "2", "C": "3", "D": "4"}


def test_hub_mmlu_pro_with_a_filter(hub):
    root, _ = hub
    rows = [
        {
            "question_id": 70 + i,
            "question": f"Which {i}?",
            "options": [f"o{j}" for j in range(10 if i else 4)],
            "answer": "CDEFGHIJAB"[i],
            "answer_index": "CDEFGHIJAB".index("CDEFGHIJAB"[i]),
            "cot_content": "",
            "category": "health" if i != 1 else "law",
            "src": "ori_mmlu-anatomy",
        }
        for i in range(3)
    ]
    write_hub_repo(root, "TIGER-Lab/MMLU-Pro", {None: {"test": rows}})
    problems = load_source(hub_source("TIGER-Lab/MMLU-Pro", "mmlu_pro", filters={"category": "health"}), "med", "en")
    assert [p.id for p in problems] == ["mmlu_pro-70", "mmlu_pro-72"]
    assert [len(p.choices) for p in problems] == [4, 10] and problems[1].answer == "E"


def test_hub_xreasoning_sets_one_split_per_language(hub):
    root, _ = hub
    aime = {lang: [{"problem": f"{lang} problem {i}", "answer": 100 + i} for i in range(2)] for lang in ("en", "ja")}
    write_hub_repo(root, "shanchen/aime_2025_multilingual", {None: aime})
    gpqa_text = {
        "en": "Which particle is a lepton?\n\nA) proton\nB) neutron\nC) electron\nD) pion",
        "ja": "レプトンはどれですか。\n\n(A) 陽子\n(B) 中性子\n(C) 電子\n(D) パイ中間子",
    }
    gpqa = {
        lang: [{"problem": text, "solution": "\\boxed{C}", "domain": "Physics"}] for lang, text in gpqa_text.items()
    }
    write_hub_repo(root, "shanchen/gpqa_diamond_mc_multilingual", {None: gpqa})
    for lang in ("en", "ja"):
        problems = load_source(
            hub_source("shanchen/aime_2025_multilingual", "xreasoning_aime", split=lang), "aime25", lang
        )
        assert [(p.id, p.answer) for p in problems] == [("aime25-000", "100"), ("aime25-001", "101")]
        (gpqa_problem,) = load_source(
            hub_source("shanchen/gpqa_diamond_mc_multilingual", "xreasoning_gpqa", split=lang), "gpqa", lang
        )
        assert gpqa_problem.answer == "C" and list(gpqa_problem.choices) == list("ABCD")
    assert gpqa_problem.question == "レプトンはどれですか。" and gpqa_problem.choices["C"] == "電子"


def test_embedded_choices_on_one_line():
    question, choices = split_embedded_choices("Pick one. (A) 1 (B) 2 (C) 3 (D) 4")
    assert question == "Pick one." and choices == {"A": "1", "B": "2", "C": "3", "D": "4"}
    with pytest.raises(loaders.RowError):
        split_embedded_choices("No choices here.")


def test_a_branch_revision_warns_and_hub_errors_name_the_repository(hub, caplog):
    root, _ = hub
    write_hub_repo(root, "GAIR/LIMO", {None: {"train": [{"question": "q?", "solution": "s", "answer": "1"}]}})
    with caplog.at_level(logging.WARNING):
        load_source(hub_source("GAIR/LIMO", "limo", split="train", revision="main"), "chains", "en")
    assert "not reproducible" in caplog.text
    with pytest.raises(SourceError, match=r"hub nobody/nothing@main split test: cannot load"):
        load_source(hub_source("nobody/nothing", "limo", revision="main"), "chains", "en")


def test_every_paper_loader_is_registered():
    assert {"limo", "math500", "mmlu", "mmmlu", "mmlu_pro", "xreasoning_aime", "xreasoning_gpqa", "fields"} <= set(
        LOADERS
    )
