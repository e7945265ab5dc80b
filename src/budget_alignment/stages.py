"""The pipeline's stages: for each, its `budget-align` command, the module that does its work and the params keys it
reads, in one place. The CLI logs exactly these keys to the stage's MLflow run, and a test checks that each stage of
dvc.yaml tracks exactly these keys and lists every project module its command imports (tests/test_stages.py).

A stage's name is its command's (`base_model` runs `budget-align base-model`) and its module's; a DVC stage instance
adds what it runs on (`translate@chains`, `grpo@sft-ja`). Keys may name the instance's `{dataset}`, `{lang}`,
`{init}` or `{regime}`, and `{prior}` (the dataset of the tiny base's reasoning prior).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    params: tuple[str, ...]

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    def keys(self, **instance: Any) -> list[str]:
        """The params keys this stage instance reads (`seed` and `profile` are logged with every stage)."""
        return [key.format(**instance) for key in self.params]


# Every model-loading stage reads the base model's dtype and which models may run their own code.
_MODEL_LOADING = ("base_model.dtype", "trust_remote_code")

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in [
        Stage(
            "base_model",
            "budget_alignment.train.base_model",
            # The tiny base's reasoning prior trains on {prior}'s chains, read from their sources.
            (
                "base_model",
                "seed",
                "compute",
                "trust_remote_code",
                "datasets.{prior}.source",
                "datasets.{prior}.translation",
                "datasets.{prior}.limit",
            ),
        ),
        Stage(
            "ingest",
            "budget_alignment.data.ingest",
            (
                "datasets.{dataset}.source",
                "datasets.{dataset}.limit",
                "contracts.max_rejected_fraction.ingest",
                "hub_mirror",
            ),
        ),
        Stage(
            "translate",
            "budget_alignment.data.translate",
            (
                "datasets.{dataset}.translation",
                "contracts.max_rejected_fraction.translate",
                "hub_mirror",
                "trust_remote_code",
            ),
        ),
        Stage(
            "normalize", "budget_alignment.data.normalize", ("normalize", "contracts.max_rejected_fraction.normalize")
        ),
        Stage("sft", "budget_alignment.train.sft", ("sft", "prompts", "compute", "seed", *_MODEL_LOADING)),
        # The rewards are the scoring code with its thresholds.
        Stage(
            "grpo", "budget_alignment.train.grpo", ("grpo", "prompts", "scoring", "compute", "seed", *_MODEL_LOADING)
        ),
        Stage("merge", "budget_alignment.merge", ("merge", "seed", "trust_remote_code")),
        Stage(
            "generate",
            "budget_alignment.evaluation.generate",
            (
                *(
                    f"evaluation.{key}"
                    for key in (
                        "datasets",
                        "backend",
                        "n",
                        "temperature",
                        "top_p",
                        "max_new_tokens",
                        "batch_size",
                        "limit",
                        "tensor_parallel_size",
                    )
                ),
                "prompts",
                "seed",
                "compute.device",
                "compute.torch_threads",
                *_MODEL_LOADING,
            ),
        ),
        Stage("score", "budget_alignment.evaluation.score", ("scoring", "evaluation.k", "evaluation.datasets")),
        Stage(
            "report",
            "budget_alignment.report",
            (
                "report",
                "languages",
                "profile",
                *(f"evaluation.{key}" for key in ("datasets", "regimes", "english_reference", "k", "n")),
            ),
        ),
    ]
}


def stage_of(instance: str) -> Stage:
    """`grpo@sft-ja` -> the grpo stage; `generate_en` and `score_en` are the generate and score stages in English."""
    name = instance.partition("@")[0].removesuffix("_en")
    return STAGES[name]
