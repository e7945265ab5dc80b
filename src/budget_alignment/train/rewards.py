"""GRPO rewards: thin wrappers over `budget_alignment.scoring`, so a reward is exactly the metric the report shows.

A reward is a function `(completions, **dataset_columns) -> list[float | None]`, named after its key in
`grpo.reward_weights` (TRL logs each one as `rewards/<name>/mean` and `rewards/<name>/std`). Each name maps to a
factory in `REWARDS` that takes the scoring params. A completion is what the model wrote after the prompt's opened
`<think>`: reasoning, `</think>`, then the answer.

- `accuracy`: 1.0 when the final answer matches the gold answer (the evaluation's answer check), else 0.0.
- `language`: the share of the reasoning's letters that are in the requested language (graded, 0.0 to 1.0; the
  language metric's `think_share`).
- `format`: 1.0 when `</think>` is followed by a non-empty `\\boxed{}`, else 0.0.
- `medical`: the medical reward head (`scoring/medical.py`): for an example of the `medical` domain, 0.5 when the
  answer names its chosen option's text in the requested language, plus 0.5 when the completion makes no
  over-assertive claim; None (not judged) for an example of another domain.

The dataset columns they read: `answer`, `answer_type`, `choices` (JSON, or empty), `lang` and `domain` (the
example's domain, `grpo.datasets.<name>.domain`; an example without one is math).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from budget_alignment.params import ScoringParams
from budget_alignment.scoring.answers import check_answer, format_ok
from budget_alignment.scoring.language import LanguageJudge
from budget_alignment.scoring.medical import check_medical_answer

RewardFunction = Callable[..., list[float | None]]


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """A completion as text: TRL passes strings for text prompts, message lists for conversational ones."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def accuracy_reward(scoring: ScoringParams) -> RewardFunction:
    def accuracy(
        completions: Sequence[Any],
        answer: Sequence[str],
        answer_type: Sequence[str],
        lang: Sequence[str],
        choices: Sequence[str] | None = None,
        **_: Any,
    ) -> list[float | None]:
        options = choices or [""] * len(completions)
        return [
            float(
                check_answer(
                    completion_text(completion),
                    gold,
                    kind,
                    choices=json.loads(option) if option else None,
                    lang=language,
                    timeout_s=scoring.math_verify_timeout_s,
                ).correct
            )
            for completion, gold, kind, language, option in zip(
                completions, answer, answer_type, lang, options, strict=True
            )
        ]

    return accuracy


def language_reward(scoring: ScoringParams) -> RewardFunction:
    judge = LanguageJudge(scoring.language)  # built once: lingua detectors are cached in it

    def language(completions: Sequence[Any], lang: Sequence[str], **_: Any) -> list[float | None]:
        return [
            judge.judge(completion_text(completion), target).think_share
            for completion, target in zip(completions, lang, strict=True)
        ]

    return language


def format_reward(scoring: ScoringParams) -> RewardFunction:
    del scoring  # the format has no threshold; the factory signature is the registry's

    # Named after its key: TRL logs a reward under its function's name.
    def format(completions: Sequence[Any], **_: Any) -> list[float | None]:
        return [float(format_ok(completion_text(completion))) for completion in completions]

    return format


MEDICAL = "medical"


def medical_reward(scoring: ScoringParams) -> RewardFunction:
    judge = LanguageJudge(scoring.language)

    def medical(
        completions: Sequence[Any],
        lang: Sequence[str],
        choices: Sequence[str] | None = None,
        domain: Sequence[str] | None = None,
        **_: Any,
    ) -> list[float | None]:
        domains = domain or ["math"] * len(completions)
        options = choices or [""] * len(completions)
        return [
            check_medical_answer(completion_text(completion), json.loads(option), language, judge).score
            if kind == MEDICAL and option
            else None
            for completion, language, option, kind in zip(completions, lang, options, domains, strict=True)
        ]

    return medical


REWARDS: dict[str, Callable[[ScoringParams], RewardFunction]] = {
    "accuracy": accuracy_reward,
    "language": language_reward,
    "format": format_reward,
    "medical": medical_reward,
}


def build_rewards(names: Sequence[str], scoring: ScoringParams) -> list[RewardFunction]:
    """The reward functions for `names`, in that order (the order of `reward_weights`)."""
    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise ValueError(f"unknown rewards {unknown}; known: {', '.join(REWARDS)}")
    return [REWARDS[name](scoring) for name in names]
