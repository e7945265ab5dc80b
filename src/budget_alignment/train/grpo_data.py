"""Stage `grpo_data`: GRPO's prompts in each language, the mixture of `grpo.datasets`, into `data/grpo/{lang}.jsonl`.

Each problem carries the domain of its dataset (`grpo.datasets.<name>.domain`), which the rewards judge it by: the
accuracy reward checks it by its answer kind (math-verify for a math answer, the letter for a multiple-choice one), the
medical reward head judges medical problems only. A domain takes the answer kinds `DOMAIN_ANSWER_TYPES` gives it (a
medical set must be multiple choice).

The mixture: the first dataset with a positive weight is taken whole, in its order; each other dataset fills its share
(the weights normalized), with its problems in a seeded order (the same ids in every language) taken from the start,
and cycled again when its share asks for more than it holds: the post's replay of medical exemplars during RL. The
datasets are interleaved evenly, so a batch of several prompts mixes them (TRL shuffles the prompts anyway). With the
recipe's one dataset the output is that dataset's problems, unchanged and in order.

The stage depends on `data/normalized` as a whole (DVC cannot list the mixture's files, since the datasets are a
param), and GRPO on its language's file only: a change to one language's data, or to a dataset outside the mixture,
reruns this stage but no other language's training, since their files stay the same.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence

from budget_alignment import paths
from budget_alignment.errors import StageError
from budget_alignment.params import DOMAIN_ANSWER_TYPES, GrpoDatasetParams, Params
from budget_alignment.records import GrpoProblem, Problem, read_records, write_records
from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """How many problems each dataset puts into the mixture: the first with a positive weight all of its `sizes`,
    each other its share relative to that one (0 for a weight of 0)."""
    first = next(index for index, weight in enumerate(weights) if weight > 0)
    per_weight = sizes[first] / weights[first]
    return [sizes[first] if index == first else round(per_weight * weight) for index, weight in enumerate(weights)]


def seeded_order(problems: Sequence[Problem], seed: int, dataset: str) -> list[Problem]:
    """A dataset's problems in an order drawn from the seed and its name alone: the same ids in every language."""
    order = sorted(problems, key=lambda problem: problem.id)
    random.Random(f"{seed}:{dataset}").shuffle(order)
    return order


def mix(
    problems: Mapping[str, Sequence[Problem]], specs: Mapping[str, GrpoDatasetParams], seed: int
) -> list[GrpoProblem]:
    """The mixture of `problems` (dataset -> its problems, in the order of `specs`), each with its domain."""
    names = list(specs)
    counts = mixture_counts([len(problems[name]) for name in names], [specs[name].weight for name in names])
    first = next(name for name in names if specs[name].weight > 0)
    keyed = []
    for rank, (name, count) in enumerate(zip(names, counts, strict=True)):
        if not count:
            continue
        pool = list(problems[name]) if name == first else seeded_order(problems[name], seed, name)
        for index in range(count):
            problem = pool[index % len(pool)]
            # Spread evenly: the k-th of n problems of a dataset sits at (k + 0.5) / n of the way.
            keyed.append(((index + 0.5) / count, rank, GrpoProblem(**problem.model_dump(), domain=specs[name].domain)))
    return [problem for *_, problem in sorted(keyed, key=lambda item: item[:2])]


def check_answer_kinds(name: str, spec: GrpoDatasetParams, problems: Sequence[Problem]) -> None:
    allowed = DOMAIN_ANSWER_TYPES[spec.domain]
    wrong = sorted({problem.answer_type for problem in problems} - set(allowed))
    if wrong:
        raise StageError(
            f"grpo.datasets.{name}: domain {spec.domain} takes {' or '.join(allowed)} answers; "
            f"the dataset has {', '.join(wrong)} answers"
        )


def gather_grpo_problems(params: Params, lang: str, run: StageRun | None = None) -> dict[str, int]:
    """Write `data/grpo/{lang}.jsonl`, the mixture of `grpo.datasets` in `lang`; the problems of each dataset."""
    specs = params.grpo.datasets
    problems: dict[str, list[Problem]] = {}
    for name, spec in specs.items():
        if spec.weight > 0:
            problems[name] = read_records(paths.normalized(name, lang), Problem)
            if not problems[name]:
                raise StageError(f"grpo.datasets.{name}: {paths.normalized(name, lang)} holds no problems")
            check_answer_kinds(name, spec, problems[name])
    used = {name: spec for name, spec in specs.items() if spec.weight > 0}
    mixture = mix(problems, used, params.seed)
    out = paths.grpo_problems(lang)
    write_records(out, mixture)
    counts = {name: sum(problem.dataset == name for problem in mixture) for name in used}
    log.info("GRPO prompts in %s: %s", lang, ", ".join(f"{name} {count}" for name, count in counts.items()))
    if run is not None:
        run.add_output(out)
        run.log_metrics({f"{lang}.prompts.{name}": count for name, count in counts.items()})
    return counts
