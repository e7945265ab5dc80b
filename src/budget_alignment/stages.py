"""The pipeline's stages: for each, its `budget-align` command, the module that does its work and the params keys it
reads, in one place. The CLI logs exactly these keys to the stage's MLflow run, and a test checks that each stage of
dvc.yaml tracks exactly these keys and lists every project module its command imports (tests/test_stages.py).

A stage's name is its command's (`base_model` runs `budget-align base-model`) and its module's; a DVC stage instance
adds what it runs on (`sft@ja`, `grpo@sft-ja`), while the data stages run over every dataset or language in one process
(one start-up, one file per dataset and language). Keys may name the instance's `{lang}`, `{init}` or `{regime}`, and
`{prior}` (the dataset of the tiny base's reasoning prior).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    # The module that does the stage's work, under budget_alignment.
    module: str
    params: tuple[str, ...]
    # The command's arguments, which name the instance (`budget-align grpo INIT LANG` -> grpo@{init}-{lang}).
    arguments: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    def keys(self, **instance: Any) -> list[str]:
        """The params keys this stage instance reads (`seed` and `profile` are logged with every stage)."""
        return [key.format(**instance) for key in self.params]


# Every model-loading stage reads the base model's dtype and which models may run their own code.
MODEL_LOADING = ("base_model.dtype", "trust_remote_code")
SAMPLING = tuple(
    f"evaluation.{key}" for key in ("backend", "n", "temperature", "top_p", "max_new_tokens", "batch_size")
)

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in [
        # The tiny base's reasoning prior trains on {prior}'s chains, read from their sources.
        Stage("base_model", "train.base_model", ("base_model", "seed", "compute", "trust_remote_code",
              "datasets.{prior}.source", "datasets.{prior}.translation", "datasets.{prior}.limit")),
        # The data stages run over every dataset (DVC cannot track `datasets.*.source` alone: `datasets` whole).
        Stage("ingest", "data.ingest", ("datasets", "contracts.max_rejected_fraction.ingest", "hub_mirror")),
        Stage("translate", "data.translate", ("datasets", "contracts.max_rejected_fraction.translate", "hub_mirror",
              "trust_remote_code")),
        Stage("normalize", "data.normalize", ("datasets", "normalize", "contracts.max_rejected_fraction.normalize")),
        Stage("sft", "train.sft", ("sft", "prompts", "compute", "seed", *MODEL_LOADING), ("lang",)),
        # The targeted SFT top-up of the languages in topup.languages (a marker for the others).
        Stage("topup", "train.topup", ("topup", "prompts", "compute", "seed", *MODEL_LOADING), ("lang",)),
        # GRPO's prompts: the mixture of grpo.datasets (a seeded sample of the datasets after the first).
        Stage("grpo_data", "train.grpo_data", ("grpo.datasets", "seed", "languages")),
        # The rewards are the scoring code with its thresholds.
        Stage("grpo", "train.grpo", ("grpo", "prompts", "scoring", "compute", "seed", *MODEL_LOADING),
              ("init", "lang")),
        Stage("merge", "merge", ("merge", "seed", "trust_remote_code")),
        # The GRPO models among the merge's members, as digests the merge depends on (merge.py).
        Stage("merge_members", "merge", ("merge.members", "merge.grpo_inits"), ("init",)),
        Stage("problems", "evaluation.problems", ("evaluation.datasets", "evaluation.limit", "normalize")),
        Stage("generate", "evaluation.generate", ("evaluation.datasets", *SAMPLING, "evaluation.tensor_parallel_size",
              "prompts", "seed", "compute.device", "compute.torch_threads", *MODEL_LOADING), ("regime", "lang")),
        # Every evaluated pair in one process (the judge's models load once): the regimes, languages, English line.
        Stage("score", "evaluation.score", ("scoring", "evaluation.k", "evaluation.datasets", "evaluation.regimes",
              "languages", "evaluation.english_reference")),
        Stage("report", "report", ("report", "languages", "profile", "evaluation.datasets", "evaluation.regimes",
              "evaluation.english_reference", "evaluation.k", "evaluation.n")),
    ]
}  # fmt: skip


def stage_of(instance: str) -> Stage:
    """`grpo@sft-ja` -> the grpo stage; `generate_en` is the generate stage in English."""
    name = instance.partition("@")[0].removesuffix("_en")
    return STAGES[name]
