"""`budget-align score-files` end to end on small files, its errors, and the process pool."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from budget_alignment import cli, tracking
from budget_alignment.evaluation import score as scoring
from budget_alignment.params import EvaluationParams, Params, ScoringParams, TrackingParams
from budget_alignment.records import Completion, Problem, Score, read_records, write_records
from budget_alignment.scoring import answers

FRENCH = "<think>Nous calculons la moitié de un, puis nous vérifions ce résultat avec beaucoup de soin.</think>"
ENGLISH = "<think>We compute half of one, and then we check this result with a lot of care.</think>"
ENGLISH_ANSWER = "The correct option is clearly the first one, so I choose it"

PROBLEMS = [
    Problem(id="p1", dataset="algebra", lang="fr", question="Moitié de un ?", answer="0.5", answer_type="math"),
    Problem(id="p2", dataset="algebra", lang="fr", question="Douze ?", answer="12", answer_type="math"),
    Problem(
        id="c1",
        dataset="quiz",
        lang="fr",
        question="Laquelle ?",
        answer="B",
        answer_type="choice",
        choices={"A": "un", "B": "deux", "C": "trois", "D": "quatre"},
    ),
    Problem(id="unused", dataset="algebra", lang="fr", question="?", answer="1", answer_type="math"),
]
# (problem, text, tokens) -> expected (correct, think_in_lang, answer_in_lang, format_ok)
SAMPLES = [
    ("p1", FRENCH + "La réponse est $\\boxed{0,5}$.", 100, (True, True, True, True)),
    ("p1", ENGLISH + "La réponse est $\\boxed{0,5}$.", 200, (True, False, True, True)),
    ("p1", FRENCH + "La réponse est 0,4.", 300, (False, True, True, False)),
    ("p2", FRENCH + "Donc $\\boxed{12}$.", 400, (True, True, True, True)),
    ("p2", FRENCH + "Donc $\\boxed{13}$.", 500, (False, True, True, True)),
    ("p2", FRENCH.removesuffix("</think>") + " Donc $\\boxed{12}$.", 600, (True, True, True, False)),
    ("c1", FRENCH + "$\\boxed{B}$", 50, (True, True, True, True)),
    ("c1", FRENCH + ENGLISH_ANSWER + ": $\\boxed{A}$.", 60, (False, True, False, True)),
    ("c1", FRENCH + "$\\boxed{C}$", 70, (False, True, True, True)),
]
# Worked out by hand from SAMPLES (n = 3 per problem; pass@2 = 1 - C(n - c, 2) / C(n, 2)).
EXPECTED_METRICS = {
    "algebra": {
        "pass@1": 2 / 3,  # c = 2 and 2 of 3
        "pass@2": 1.0,  # n - c = 1 < 2
        "following": 5 / 6,
        "think_following": 5 / 6,
        "answer_following": 1.0,
        "format": 4 / 6,
        "correct_and_following": 3 / 6,
        "problems": 2,
        "samples": 6,
        "mean_completion_tokens": 350.0,
    },
    "quiz": {
        "pass@1": 1 / 3,
        "pass@2": 2 / 3,  # 1 - C(2,2)/C(3,2)
        "following": 2 / 3,
        "think_following": 1.0,
        "answer_following": 2 / 3,
        "format": 1.0,
        "correct_and_following": 1 / 3,
        "problems": 1,
        "samples": 3,
        "mean_completion_tokens": 60.0,
    },
}


def _completions() -> list[Completion]:
    samples: dict[str, int] = {}
    completions = []
    for problem_id, text, tokens, _ in SAMPLES:
        sample = samples[problem_id] = samples.get(problem_id, -1) + 1
        completions.append(
            Completion(
                problem_id=problem_id,
                model="sft-fr",
                lang="fr",
                sample=sample,
                text=text,
                tokens=tokens,
                finish_reason="stop",
            )
        )
    return completions


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    problems, completions = tmp_path / "problems.jsonl", tmp_path / "completions.jsonl"
    write_records(problems, PROBLEMS)
    write_records(completions, _completions())
    return problems, completions


@pytest.fixture
def params(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Params:
    """The sections the score stage reads; the rest of params.yaml belongs to other stages and is left out."""
    loaded = Params.model_construct(
        profile="tiny",
        seed=0,
        scoring=ScoringParams(workers=1),
        evaluation=EvaluationParams(datasets=["algebra", "quiz"], n=3, k=[1, 2]),
        tracking=TrackingParams(enabled=False),
    )
    monkeypatch.setattr(cli, "load", lambda _path: loaded)
    monkeypatch.chdir(tmp_path)  # where a pipeline's reports/ and mlflow.db would be
    return loaded


def _run(*args: str):
    return CliRunner().invoke(cli.app, ["score-files", *args])


def _assert_clean_error(result, *fragments: str) -> None:
    output = result.output
    assert result.exit_code == 1, output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, output


def test_score_command_end_to_end(files: tuple[Path, Path], params: Params, tmp_path: Path) -> None:
    problems, completions = files
    out = tmp_path / "scores" / "sft-fr.jsonl"
    result = _run(str(problems), str(completions), "--out", str(out))
    assert result.exit_code == 0, result.output

    scores = read_records(out, Score)
    assert [(s.problem_id, s.sample) for s in scores] == [(c.problem_id, c.sample) for c in _completions()]
    observed = [(s.correct, s.think_in_lang, s.answer_in_lang, s.format_ok) for s in scores]
    assert observed == [expected for *_, expected in SAMPLES]
    assert all(s.following == (s.think_in_lang and s.answer_in_lang) for s in scores)
    assert scores[0].extracted == "0,5"

    metrics = json.loads((tmp_path / "scores" / "sft-fr.metrics.json").read_text(encoding="utf-8"))
    # A tool beside the pipeline: nothing lands in the pipeline's folders, no MLflow run in its experiment.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["completions.jsonl", "problems.jsonl", "scores"]
    assert metrics.keys() == EXPECTED_METRICS.keys()
    for dataset, expected in EXPECTED_METRICS.items():
        assert metrics[dataset].keys() == expected.keys()
        for name, value in expected.items():
            assert metrics[dataset][name] == pytest.approx(value), (dataset, name)


def test_metrics_path_can_be_chosen(files: tuple[Path, Path], params: Params, tmp_path: Path) -> None:
    problems, completions = files
    chosen = tmp_path / "elsewhere" / "m.json"
    result = _run(str(problems), str(completions), "--out", str(tmp_path / "s.jsonl"), "--metrics", str(chosen))
    assert result.exit_code == 0, result.output
    assert json.loads(chosen.read_text(encoding="utf-8"))["quiz"]["samples"] == 3
    assert not (tmp_path / "s.metrics.json").exists()


def test_a_malformed_line_is_a_clean_error_naming_file_and_line(
    files: tuple[Path, Path], params: Params, tmp_path: Path
) -> None:
    problems, completions = files
    lines = completions.read_text(encoding="utf-8").splitlines()
    lines[2] = '{"problem_id": "p1", "sample": 2'
    completions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "s.jsonl"
    result = _run(str(problems), str(completions), "--out", str(out))
    _assert_clean_error(result, f"{completions}:3", "not valid JSON")
    assert not out.exists()


def test_an_invalid_record_is_a_clean_error_naming_file_line_and_field(
    files: tuple[Path, Path], params: Params, tmp_path: Path
) -> None:
    problems, completions = files
    lines = completions.read_text(encoding="utf-8").splitlines()
    lines[4] = json.dumps(json.loads(lines[4]) | {"tokens": "many"})
    completions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = _run(str(problems), str(completions), "--out", str(tmp_path / "s.jsonl"))
    _assert_clean_error(result, f"{completions}:5", "tokens")


def test_an_unknown_problem_id_is_a_clean_error_naming_file_and_line(
    files: tuple[Path, Path], params: Params, tmp_path: Path
) -> None:
    problems, completions = files
    lines = completions.read_text(encoding="utf-8").splitlines()
    # A blank line first: the line number must still be the file's.
    lines.insert(0, "")
    lines[7] = json.dumps(json.loads(lines[7]) | {"problem_id": "p9"})
    completions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = _run(str(problems), str(completions), "--out", str(tmp_path / "s.jsonl"))
    _assert_clean_error(result, f"{completions}:8", "'p9'", "not in the problems file")


def test_a_repeated_sample_is_a_clean_error(files: tuple[Path, Path], params: Params, tmp_path: Path) -> None:
    problems, completions = files
    lines = completions.read_text(encoding="utf-8").splitlines()
    completions.write_text("\n".join([*lines, lines[0]]) + "\n", encoding="utf-8")
    result = _run(str(problems), str(completions), "--out", str(tmp_path / "s.jsonl"))
    _assert_clean_error(result, f"{completions}:10", "sample 0 appears twice")


def test_too_few_samples_for_a_k_score_the_rest_and_name_what_was_left_out(
    files: tuple[Path, Path], params: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    problems, completions = files
    lines = completions.read_text(encoding="utf-8").splitlines()
    completions.write_text("\n".join(lines[:-2]) + "\n", encoding="utf-8")  # c1 keeps one sample
    out = tmp_path / "s.jsonl"
    with caplog.at_level("WARNING"):
        result = _run(str(problems), str(completions), "--out", str(out))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "s.metrics.json").read_text(encoding="utf-8"))
    # quiz: one problem with one sample, so pass@1 only; algebra keeps both and lists nothing.
    assert metrics["quiz"]["pass@1"] == 1.0  # its one sample is the right letter
    assert "pass@2" not in metrics["quiz"]
    assert metrics["quiz"]["left_out"] == ["pass@2"]
    assert metrics["quiz"]["samples"] == 1
    assert "left_out" not in metrics["algebra"]
    assert metrics["algebra"]["pass@2"] == pytest.approx(EXPECTED_METRICS["algebra"]["pass@2"])
    assert "quiz: pass@2 left out: a problem has only 1 sample" in caplog.text
    # MLflow and DVC get numbers only: the list is skipped by the tracker, and stays a plain JSON list in the file.
    assert tracking.flatten(metrics)["quiz.left_out"] == ["pass@2"]


def test_one_sample_per_problem_scores_pass_at_1_only() -> None:
    scores = [
        Score(
            problem_id=f"p{i}",
            sample=0,
            extracted="1",
            correct=i % 2 == 0,
            think_in_lang=True,
            answer_in_lang=True,
            following=True,
            format_ok=True,
        )
        for i in range(4)
    ]
    metrics = scoring.dataset_metrics(scores, [10] * 4, [1, 4, 2])
    assert metrics["pass@1"] == 0.5
    assert metrics["left_out"] == ["pass@2", "pass@4"]
    assert not {"pass@2", "pass@4"} & metrics.keys()


def test_a_missing_input_is_a_clean_error(params: Params, tmp_path: Path) -> None:
    result = _run(str(tmp_path / "none.jsonl"), str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "s.jsonl"))
    _assert_clean_error(result, "none.jsonl")


def test_tracking_metric_names_have_no_at_sign() -> None:
    assert tracking.mlflow_key("quiz.pass@10") == "quiz.pass_at_10"
    assert tracking.flatten({"quiz": {"pass@10": 0.5}}) == {"quiz.pass@10": 0.5}


# --- the process pool ----------------------------------------------------------------------------------------------


def test_signal_timeouts_work_in_pool_workers() -> None:
    with ProcessPoolExecutor(max_workers=1) as pool:
        assert pool.submit(answers._timeouts_available).result()


@pytest.mark.slow
def test_the_pool_gives_the_same_verdicts_as_one_process() -> None:
    problems = {problem.id: problem for problem in PROBLEMS}
    repeats = scoring.MIN_PARALLEL_COMPLETIONS // len(SAMPLES) + 1
    completions = _completions() * repeats
    jobs = [scoring.to_job(c, problems[c.problem_id]) for c in completions]
    parallel = scoring.judge_all(jobs, ScoringParams(), workers=2)
    serial = scoring.judge_all(jobs, ScoringParams(), workers=1)
    assert parallel == serial
    assert len(parallel) == len(completions) >= scoring.MIN_PARALLEL_COMPLETIONS
    expected = [(correct, think, answer, fmt) for *_, (correct, think, answer, fmt) in SAMPLES] * repeats
    assert [(v[1], v[2], v[3], v[4]) for v in parallel] == expected
