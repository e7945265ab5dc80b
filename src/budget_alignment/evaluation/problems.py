"""Stage `problems`: the evaluation problems of each language, gathered from the normalized data.

Every set of `evaluation.datasets`, its first `evaluation.limit` problems, one file per set under
`data/problems/{lang}/`. Generation and scoring of a language read its folder only, so a change to another
language's data, or to a training set, reruns this cheap stage but none of this language's evaluation (DVC cannot
name one file per evaluation set in a stage's deps, since the sets are a param).
"""

from __future__ import annotations

import logging
from pathlib import Path

from budget_alignment import paths
from budget_alignment.io import atomic_directory
from budget_alignment.params import Params
from budget_alignment.records import Problem, read_records, write_records
from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)


def gather_problems(params: Params, lang: str, run: StageRun | None = None) -> dict[str, int]:
    """Write `data/problems/{lang}/{dataset}.jsonl` for every evaluation set; the problem count of each."""
    limit = params.evaluation.limit
    counts = {}
    out = paths.problems_dir(lang)
    with atomic_directory(out) as tmp:
        for dataset in params.evaluation.datasets:
            problems = read_records(paths.normalized(dataset, lang), Problem)
            counts[dataset] = write_records(tmp / f"{dataset}.jsonl", problems[:limit] if limit else problems)
    log.info("problems in %s: %s", lang, ", ".join(f"{d} {n}" for d, n in counts.items()))
    if run is not None:
        run.add_output(out)
        run.log_metrics({f"{lang}.problems.{dataset}": count for dataset, count in counts.items()})
    return counts


def read_problems(lang: str, dataset: str) -> list[Problem]:
    """The evaluation problems of a set in a language, as the problems stage wrote them."""
    return read_records(problems_file(lang, dataset), Problem)


def problems_file(lang: str, dataset: str) -> Path:
    return paths.problems_dir(lang) / f"{dataset}.jsonl"
