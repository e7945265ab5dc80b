"""Stage score: judge every completion (answer, language, format) and compute the metrics of a generation run.

Metrics are fractions in [0, 1] (never percentages), per dataset:
`pass@k` for each k of `evaluation.k` that every problem has samples for, `following`, `think_following`,
`answer_following`, `format`, `correct_and_following`, and the counts `problems`, `samples`,
`mean_completion_tokens`; `left_out` lists the pass@k that too few samples left out (absent when none is).

Scoring runs over a process pool: math-verify's `signal.alarm` timeouts work in each worker's main thread, and the
workers, forked from a parent that has already imported math-verify and loaded the lingua models, share them.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from budget_alignment import paths
from budget_alignment.errors import StageError
from budget_alignment.evaluation.problems import problems_file
from budget_alignment.io import write_json
from budget_alignment.params import Params, ScoringParams
from budget_alignment.records import Completion, Problem, RecordError, Score, read_records, write_records
from budget_alignment.scoring.answers import check_answer, format_ok
from budget_alignment.scoring.language import LanguageJudge
from budget_alignment.scoring.passk import joint_rate, mean_pass_at_k, rate
from budget_alignment.tracking import StageRun, flatten

log = logging.getLogger(__name__)

# Below this many completions a process pool costs more (start-up, lingua models per worker) than it saves.
MIN_PARALLEL_COMPLETIONS = 256

# What one worker needs to judge one completion: text, requested language, gold, answer type, choices.
Job = tuple[str, str, str, str, dict[str, str] | None]
# What it sends back: extracted, correct, think_in_lang, answer_in_lang, format_ok.
Verdict = tuple[str | None, bool, bool, bool, bool]


class ScoringError(StageError, ValueError):
    """The inputs of the score stage cannot be scored (no completions at all)."""


# --- judging -------------------------------------------------------------------------------------------------------

_worker_state: tuple[LanguageJudge, int] | None = None


def _judge_and_timeout(scoring: ScoringParams) -> tuple[LanguageJudge, int]:
    return LanguageJudge(scoring.language), scoring.math_verify_timeout_s


def _init_worker(scoring: ScoringParams) -> None:
    global _worker_state
    _worker_state = _judge_and_timeout(scoring)


def judge_one(job: Job, judge: LanguageJudge, timeout_s: int | None) -> Verdict:
    text, lang, gold, answer_type, choices = job
    answer = check_answer(text, gold, answer_type, choices=choices, lang=lang, timeout_s=timeout_s)
    language = judge.judge(text, lang)
    return answer.extracted, answer.correct, language.think_in_lang, language.answer_in_lang, format_ok(text)


def _judge_chunk(jobs: list[Job]) -> list[Verdict]:
    if _worker_state is None:  # pragma: no cover - the pool always runs the initializer first
        raise RuntimeError("scoring worker used before its initializer ran")
    judge, timeout_s = _worker_state
    return [judge_one(job, judge, timeout_s) for job in jobs]


def _warm_up(jobs: Sequence[Job], scoring: ScoringParams) -> None:
    """Import math-verify and load the lingua models here, once, before the pool starts.

    Workers forked from this process share them instead of each loading them again (about 1.5 s of CPU per
    worker); where workers are spawned instead of forked, this costs one such load and saves nothing.
    """
    judge, timeout_s = _judge_and_timeout(scoring)
    for job in {job[1]: job for job in jobs}.values():  # one completion per requested language
        judge_one(job, judge, timeout_s)


def judge_all(jobs: Sequence[Job], scoring: ScoringParams, workers: int | None = None) -> list[Verdict]:
    """Judge every job, in order; over a process pool of `workers` (default: scoring.workers or every core)."""
    workers = workers or scoring.workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < MIN_PARALLEL_COMPLETIONS:
        judge, timeout_s = _judge_and_timeout(scoring)
        return [judge_one(job, judge, timeout_s) for job in jobs]
    _warm_up(jobs, scoring)
    # Several chunks per worker even out slow and fast chunks; a chunk is large enough to amortize pickling.
    size = max(16, min(512, len(jobs) // (workers * 8) + 1))
    chunks = [list(jobs[start : start + size]) for start in range(0, len(jobs), size)]
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(scoring,)) as pool:
        return [verdict for chunk in pool.map(_judge_chunk, chunks) for verdict in chunk]


# --- matching completions to problems ------------------------------------------------------------------------------


def _line_numbers(path: Path) -> list[int]:
    """The line number of each record in a jsonl file (blank lines hold no record)."""
    with path.open(encoding="utf-8") as handle:
        return [number for number, line in enumerate(handle, start=1) if line.strip()]


def match_problems(
    problems: Mapping[str, Problem], completions: Sequence[Completion], completions_path: Path
) -> list[Problem]:
    """The problem of each completion; an unknown problem id or a repeated sample names its file and line."""
    matched: list[Problem] = []
    seen: set[tuple[str, int]] = set()
    for index, completion in enumerate(completions):
        problem = problems.get(completion.problem_id)
        key = (completion.problem_id, completion.sample)
        if problem is None or key in seen:
            line = _line_numbers(completions_path)[index]
            what = "is not in the problems file" if problem is None else f"sample {completion.sample} appears twice"
            raise RecordError(f"{completions_path}:{line}: problem_id {completion.problem_id!r} {what}")
        seen.add(key)
        matched.append(problem)
    return matched


def to_job(completion: Completion, problem: Problem) -> Job:
    # The requested language is the completion's: the English reference asks translated problems in English.
    return completion.text, completion.lang, problem.answer, problem.answer_type, problem.choices


# --- metrics -------------------------------------------------------------------------------------------------------


def dataset_metrics(
    scores: Sequence[Score], tokens: Sequence[int], ks: Iterable[int], dataset: str = ""
) -> dict[str, Any]:
    """The metrics of one dataset's scores (fractions in [0, 1]).

    pass@k needs k samples of every problem: a k above the fewest samples of a problem is left out, named in
    `left_out` (only then present: a list, which MLflow's and the report's flattening skip) and in a warning.
    """
    per_problem: dict[str, list[bool]] = defaultdict(list)
    for score in scores:
        per_problem[score.problem_id].append(score.correct)
    ks = sorted(set(ks))
    fewest = min(map(len, per_problem.values()))
    counts = [(len(correct), sum(correct)) for correct in per_problem.values()]
    metrics: dict[str, Any] = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks if k <= fewest}
    metrics |= {
        "following": rate([s.following for s in scores]),
        "think_following": rate([s.think_in_lang for s in scores]),
        "answer_following": rate([s.answer_in_lang for s in scores]),
        "format": rate([s.format_ok for s in scores]),
        "correct_and_following": joint_rate([s.correct for s in scores], [s.following for s in scores]),
        "problems": len(per_problem),
        "samples": len(scores),
        "mean_completion_tokens": sum(tokens) / len(tokens),
    }
    left_out = [f"pass@{k}" for k in ks if k > fewest]
    if left_out:
        metrics["left_out"] = left_out
        log.warning(
            "%s%s left out: a problem has only %d sample%s (evaluation.k asks for up to %d)",
            f"{dataset}: " if dataset else "",
            ", ".join(left_out),
            fewest,
            "" if fewest == 1 else "s",
            ks[-1],
        )
    return metrics


def compute_metrics(
    problems: Sequence[Problem], completions: Sequence[Completion], scores: Sequence[Score], ks: Iterable[int]
) -> dict[str, dict[str, Any]]:
    """Metrics per dataset; `problems[i]` and `completions[i]` belong to `scores[i]`."""
    by_dataset: dict[str, tuple[list[Score], list[int]]] = defaultdict(lambda: ([], []))
    for problem, completion, score in zip(problems, completions, scores, strict=True):
        by_dataset[problem.dataset][0].append(score)
        by_dataset[problem.dataset][1].append(completion.tokens)
    ks = list(ks)
    return {dataset: dataset_metrics(s, tokens, ks, dataset) for dataset, (s, tokens) in sorted(by_dataset.items())}


# --- the stage -----------------------------------------------------------------------------------------------------


def metrics_path_for(scores_path: Path) -> Path:
    """`scores.jsonl` -> `scores.metrics.json`."""
    return scores_path.with_suffix(".metrics.json")


def score_completions(
    problems: Mapping[str, Problem],
    completions: Sequence[Completion],
    completions_path: Path,
    scoring: ScoringParams,
    ks: Iterable[int],
) -> tuple[list[Score], dict[str, dict[str, Any]]]:
    """Judge every completion and compute the metrics; nothing is written."""
    matched = match_problems(problems, completions, completions_path)
    verdicts = judge_all([to_job(c, p) for c, p in zip(completions, matched, strict=True)], scoring)
    scores = [
        Score(
            problem_id=completion.problem_id,
            sample=completion.sample,
            extracted=extracted,
            correct=correct,
            think_in_lang=think,
            answer_in_lang=answer,
            following=think and answer,
            format_ok=formatted,
        )
        for completion, (extracted, correct, think, answer, formatted) in zip(completions, verdicts, strict=True)
    ]
    return scores, compute_metrics(matched, completions, scores, ks)


def score_paths(
    problems_path: Path,
    completions_path: Path,
    scores_path: Path,
    scoring: ScoringParams,
    ks: Iterable[int],
    metrics_path: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Read PROBLEMS and COMPLETIONS, write SCORES and its metrics JSON (beside it by default); returns the metrics.

    Raises RecordError (a malformed or unknown record, with file and line) or ScoringError.
    """
    problems_path, completions_path, scores_path = Path(problems_path), Path(completions_path), Path(scores_path)
    problems = {problem.id: problem for problem in read_records(problems_path, Problem)}
    completions = read_records(completions_path, Completion)
    if not completions:
        raise ScoringError(f"{completions_path}: no completions to score")
    scores, metrics = score_completions(problems, completions, completions_path, scoring, ks)
    write_records(scores_path, scores)
    write_json(metrics_path or metrics_path_for(scores_path), metrics)
    for dataset, values in metrics.items():
        log.info("%s: %s", dataset, ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, float)))
    return metrics


def score_files(
    problems_path: Path, completions_path: Path, scores_path: Path, params: Params, metrics_path: Path | None = None
) -> dict[str, dict[str, Any]]:
    """Stage score with the project's parameters: `scoring` and `evaluation.k`."""
    return score_paths(problems_path, completions_path, scores_path, params.scoring, params.evaluation.k, metrics_path)


def score_generations(
    params: Params, regime: str, lang: str, run: StageRun | None = None
) -> dict[str, dict[str, Any]]:
    """Stage score for one regime and language: score the cached generations of every evaluation set against its
    problems.

    Writes data/scores/REGIME-LANG/DATASET.jsonl and the metrics of every dataset to reports/scores/REGIME-LANG.json;
    MLflow gets them as `REGIME.LANG.DATASET.METRIC` (one run judges every pair). Generation and scoring are separate
    stages, so a change of a scoring threshold re-scores without regenerating.
    """
    metrics: dict[str, dict[str, Any]] = {}
    for dataset in params.evaluation.datasets:
        problems_path = problems_file(lang, dataset)
        completions_path = paths.generations_dir(regime, lang) / f"{dataset}.jsonl"
        problems = {problem.id: problem for problem in read_records(problems_path, Problem)}
        completions = read_records(completions_path, Completion)
        if not completions:
            raise ScoringError(f"{completions_path}: no completions to score")
        scores, by_dataset = score_completions(
            problems, completions, completions_path, params.scoring, params.evaluation.k
        )
        write_records(paths.scores_dir(regime, lang) / f"{dataset}.jsonl", scores)
        # The problems carry their dataset's name; one file holds one dataset.
        (values,) = by_dataset.values()
        metrics[dataset] = values
    write_json(paths.score_metrics_file(regime, lang), metrics)
    if run is not None:
        run.add_output(paths.scores_dir(regime, lang))
        run.log_metrics(flatten({regime: {lang: metrics}}))
    return metrics
