"""The tiny base's English reasoning prior (`base_model.reasoning_prior`; the tiny profile only).

DeepSeek-R1-Distill reasons in English (or Chinese) whatever the language of the question; that prior is what the
recipe's SFT fixes. SmolLM2-135M-Instruct has none: asked in Japanese or French it already writes in that language.
So the tiny `base_model` stage first gives it the prior: SFT (the same `sft.fine_tune`, loss on the assistant turn
only, which is what makes the prior take) on the chains with the question in every language of
`question_languages`, the reasoning in English and the answer sentence in the question's language; then the LoRA is
merged into the weights and the result is the tiny base.

The chains are read from the dataset's sources (the English source and the human translations), not from the data
stages' outputs, so `base_model` stays the first stage of the DAG: the data stages may translate with the base.
The prompts use the default prompt settings: the prior stands in for the base's pre-training, which the recipe's
prompt switches (`prompts.think_prefix`) do not change.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from budget_alignment import loading, tracking
from budget_alignment.data.sources import SourceError, load_source
from budget_alignment.params import Params, PromptParams
from budget_alignment.records import Problem
from budget_alignment.tracking import StageRun
from budget_alignment.train import checkpoints, outputs, sft
from budget_alignment.train import trainer_setup as setup

log = logging.getLogger(__name__)

ENGLISH = "en"

BATCH_KEY = "base_model.reasoning_prior.training.batch_size"


def prior_chains(params: Params) -> dict[str, list[Problem]]:
    """The prior's chains per language (English and every question language), from the dataset's sources."""
    settings = params.base_model.reasoning_prior
    if settings is None:
        raise setup.TrainingError("base_model.reasoning_prior is not set")
    spec = params.datasets[settings.dataset]
    chains: dict[str, list[Problem]] = {}
    for lang in dict.fromkeys([ENGLISH, *settings.question_languages]):
        if lang == ENGLISH:
            source = spec.source
        else:
            translation = spec.translation.get(lang)
            if translation is None or translation.human is None:
                raise setup.TrainingError(
                    f"base_model.reasoning_prior: dataset {settings.dataset!r} has no human translation into "
                    f"{lang!r} (datasets.{settings.dataset}.translation.{lang}.human); the prior reads sources only"
                )
            source = translation.human
        try:
            problems = load_source(source, settings.dataset, lang)
        except SourceError as error:
            raise setup.TrainingError(f"base_model.reasoning_prior: {error}") from None
        chains[lang] = problems[: spec.limit] if spec.limit else problems
    return chains


def prior_examples(chains: dict[str, list[Problem]], tokenizer: Any, question_languages: list[str]) -> list[dict]:
    """Every problem asked in every question language, reasoned in English, answered in the question's language."""
    english = {problem.id: problem for problem in chains[ENGLISH]}
    examples = []
    for lang in question_languages:
        examples += sft.sft_examples(chains[lang], tokenizer, PromptParams(), reasoning_from=english)
    return examples


def apply_reasoning_prior(params: Params, model_dir: Path, run: StageRun | None = None) -> dict[str, Any]:
    """Fine-tune the model in `model_dir` with the English reasoning prior and write the merged weights back there.

    Returns the prior's training metrics (the base model's provenance keeps them).
    """
    import torch

    settings = params.base_model.reasoning_prior
    if settings is None:
        raise setup.TrainingError("base_model.reasoning_prior is not set")
    stage = tracking.stage_name("base_model")
    training = settings.training
    chains = prior_chains(params)
    tokenizer = loading.load_model_tokenizer(model_dir, params)
    examples = prior_examples(chains, tokenizer, settings.question_languages)
    # The base's folder is written anew by every run (new mtimes); its source and the data identify the run.
    source = params.base_model.model_dump(mode="json", exclude={"reasoning_prior"})
    precision = loading.bf16_mixed_precision(params.compute)
    digest = checkpoints.fingerprint(stage, source, settings.model_dump(mode="json"), params.seed, precision, examples)
    checkpoint_dir = checkpoints.checkpoint_dir(stage, digest)
    trainer, metrics = sft.fine_tune(
        stage=stage,
        model=loading.load_model(model_dir, params),
        tokenizer=tokenizer,
        examples=examples,
        training=training,
        max_length=max(training.max_length_for(lang) for lang in settings.question_languages),
        compute=params.compute,
        seed=params.seed,
        checkpoint_dir=checkpoint_dir,
        run=run,
        batch_key=BATCH_KEY,
    )
    model = trainer.model.merge_and_unload() if training.use_lora else trainer.model
    model = model.to(getattr(torch, params.base_model.dtype))
    staging = model_dir.parent / f".{model_dir.name}.prior"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    for entry in staging.iterdir():  # weights and configs replace the converted ones; the tokenizer stays
        entry.replace(model_dir / entry.name)
    shutil.rmtree(staging, ignore_errors=True)
    checkpoints.remove_checkpoints(checkpoint_dir)
    log.info(
        "reasoning prior merged into %s (%d examples, %d steps)", model_dir, len(examples), metrics["global_step"]
    )
    if run is not None:
        run.add_budget(**outputs.budget_figures(metrics))
        run.log_metrics({f"prior.{k}": v for k, v in metrics.items()})
    return metrics
