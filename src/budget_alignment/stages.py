"""The pipeline's stages: for each, its `budget-align` command, the module that does its work and the params keys it
reads, in one place. The CLI logs exactly these keys to the stage's MLflow run, and a test checks that each stage of
dvc.yaml tracks exactly these keys and lists every project module its command imports (tests/test_stages.py).

A stage's name is its command's (`base_model` runs `budget-align base-model`) and its module's; a DVC stage instance
adds what it runs on (`sft@ja`, `grpo@sft-ja`), while the data stages run over every dataset or language in one process
(one start-up, one file per dataset and language). Keys may name the instance's `{lang}`, `{init}` or `{regime}`, and
`{prior}` (the dataset of the tiny base's reasoning prior).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from budget_alignment import paths


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
        # Every language the regime is evaluated in, in one process (a language whose inputs did not change reuses
        # its completions: evaluation/generate.py).
        Stage("generate", "evaluation.generate", ("evaluation.datasets", *SAMPLING, "evaluation.tensor_parallel_size",
              "evaluation.english_reference", "languages", "prompts", "seed", "compute.device",
              "compute.torch_threads", "compute.mixed_precision", *MODEL_LOADING), ("regime",)),
        # Every evaluated pair in one process (the judge's models load once): the regimes, languages, English line.
        Stage("score", "evaluation.score", ("scoring", "evaluation.k", "evaluation.datasets", "evaluation.regimes",
              "languages", "evaluation.english_reference")),
        Stage("report", "report", ("report", "languages", "profile", "evaluation.datasets", "evaluation.regimes",
              "evaluation.english_reference", "evaluation.k", "evaluation.n")),
    ]
}  # fmt: skip


def stage_of(instance: str) -> Stage:
    """`grpo@sft-ja` -> the grpo stage."""
    return STAGES[instance.partition("@")[0]]


# --- the model folders of the grpo and generate stages ---------------------------------------------------------------
# DVC's matrix cannot map a regime to one language's model folder (`data/models/sft/ja`, but `data/models/base` for
# every language), so dvc.yaml generates these stages from `stage_instances` in params.yaml: each instance with the
# model folders it may read. A grpo@{init}-{lang} reads shared folders (the base) or its language's own, so a change to
# one language's data reruns that language's models only; a generate@{regime} reads its regime's folders of every
# language (and reuses the completions of a language whose model did not change). Hydra derives the section from the
# keys it depends on when it composes params.yaml (conf/config.yaml), through the resolver below, which hydra_plugins/
# registers in DVC's process.

RESOLVER = "stage_instances"
# A stage reads up to this many model folders beside the base; dvc.yaml lists `${item.models[0]}` to `[2]`, and an
# instance that reads fewer repeats the base (DVC hashes a folder once, however often it is listed).
MODEL_SLOTS = 3


def _folder(model: str) -> str:
    return paths.model_dir(model).as_posix()


def _sft_start(lang: str) -> list[str]:
    """Where GRPO from SFT starts in `lang`: the SFT model, or its top-up (fixed bytes when switched off)."""
    return [_folder(f"sft-{lang}"), _folder(f"topup-{lang}")]


def models_read(regime: str) -> list[str]:
    """The folders besides the base that a regime's models may load from, in every language: the regime's and, for
    GRPO from SFT, those of where it started. An adapter loads the parent it records (`loading.adapter_parent`), the
    base or one of these."""
    if regime == "base":
        return []
    regimes = ["sft", "topup", "grpo_sft"] if regime == "grpo_sft" else [regime]
    return [paths.regime_models_dir(name).as_posix() for name in regimes]


def grpo_models(init: str, lang: str, reference: str) -> list[str]:
    """What grpo@{init}-{lang} reads besides the base: the policy's start and the KL term's reference."""
    start = [] if init == "base" else _sft_start(lang)
    return list(dict.fromkeys([*start, *([] if reference == "base" else [_folder(f"sft-{lang}")])]))


def _slots(models: list[str]) -> list[str]:
    assert len(models) <= MODEL_SLOTS, models
    return models + [paths.base_model_dir().as_posix()] * (MODEL_SLOTS - len(models))


def stage_instances(
    inits: Iterable[str], regimes: Iterable[str], languages: Iterable[str], reference: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """`stage_instances` of params.yaml: dvc.yaml's grpo@{init}-{lang} and generate@{regime}, each with its model
    folders (`models`, MODEL_SLOTS long). The arguments are OmegaConf lists where Hydra calls it."""
    languages = list(languages)
    return {
        "grpo": {
            f"{init}-{lang}": {"init": init, "lang": lang, "models": _slots(grpo_models(init, lang, reference))}
            for init in inits
            for lang in languages
        },
        "generate": {regime: {"regime": regime, "models": _slots(models_read(regime))} for regime in regimes},
    }


def register_resolver() -> None:
    """Make `${stage_instances:...}` known to OmegaConf (conf/config.yaml), in this process."""
    from omegaconf import OmegaConf

    def resolve(inits: Any, regimes: Any, languages: Any, reference: str) -> Any:
        # A container, which OmegaConf.resolve (DVC's composition) puts in place of the interpolation.
        return OmegaConf.create(stage_instances(inits, regimes, languages, reference))

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, resolve)
