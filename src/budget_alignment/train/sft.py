"""Stage `sft@{lang}`: supervised fine-tuning on the normalized reasoning chains of one language (TRL SFTTrainer).

Examples are prompt/completion pairs from `prompts.training_example`: the prompt is the chat up to the opened
`<think>`, the completion is the reasoning, `</think>`, the answer sentence and the end-of-turn token. The loss
covers the completion only (`completion_only_loss`), so the model learns to reason and answer, not to write
questions. LoRA or full fine-tuning as `sft.use_lora` says.

Output: `data/models/sft/{lang}/`, the PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`,
tokenizer files) on top of `data/models/base` for LoRA, or a whole safetensors model folder for full fine-tuning
(`loading.load_model` loads either); metrics in `reports/train/sft@{lang}.json`.

`fine_tune` is the training itself; the tiny base's reasoning prior (`prior.py`) calls it too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from budget_alignment import loading, paths, prompts
from budget_alignment.params import ComputeParams, Params, PromptParams, SftParams, TopupParams, TrainingParams
from budget_alignment.records import Problem
from budget_alignment.tracking import StageRun
from budget_alignment.train import checkpoints, outputs
from budget_alignment.train import trainer_setup as setup

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import SFTConfig, SFTTrainer

log = logging.getLogger(__name__)

# The param that sets the global batch (the reasoning prior has its own).
BATCH_KEY = "sft.batch_size"
# The params sections the stage reads (dvc.yaml lists the same; `seed` and `profile` are always logged).
SECTIONS = ["sft", "prompts", "compute"]


def stage_name(lang: str) -> str:
    return f"sft@{lang}"


def sft_examples(
    problems: Sequence[Problem],
    tokenizer: PreTrainedTokenizerBase,
    settings: PromptParams,
    reasoning_from: Mapping[str, Problem] | None = None,
) -> list[dict[str, str]]:
    """Prompt/completion pairs; `reasoning_from` maps a problem id to the record whose reasoning is used instead."""
    examples = []
    for problem in problems:
        donor = reasoning_from.get(problem.id) if reasoning_from is not None else None
        if reasoning_from is not None and donor is None:
            raise setup.TrainingError(f"no reasoning record for problem {problem.id}")
        try:
            example = prompts.training_example(tokenizer, problem, settings, reasoning_from=donor)
        except ValueError as error:
            raise setup.TrainingError(str(error)) from None
        example["prompt"] = prompts.without_duplicate_bos(tokenizer, example["prompt"])
        examples.append(example)
    return examples


def count_truncated(examples: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Examples longer than `max_length` tokens: their answer is cut off in training."""
    texts = [example["prompt"] + example["completion"] for example in examples]
    return sum(len(ids) > max_length for ids in tokenizer(texts)["input_ids"])


def sft_config(
    training: TrainingParams,
    *,
    stage: str,
    max_length: int,
    compute: ComputeParams,
    seed: int,
    output_dir: Path,
    batch_key: str = BATCH_KEY,
) -> SFTConfig:
    """The SFT hyper-parameters as TRL's SFTConfig; the global batch is split over this run's processes."""
    from trl import SFTConfig

    batch = setup.batch_plan(training.batch_size, training.per_device_batch_size, setup.world_size(), batch_key)
    return SFTConfig(
        **setup.common_arguments(
            stage=stage,
            output_dir=output_dir,
            compute=compute,
            seed=seed,
            save_steps=training.save_steps,
            logging_steps=training.logging_steps,
            gradient_checkpointing=training.gradient_checkpointing,
        ),
        learning_rate=training.learning_rate,
        num_train_epochs=training.num_train_epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=batch.per_device,
        gradient_accumulation_steps=batch.accumulation,
        warmup_steps=training.warmup_ratio,  # a float below 1 is a ratio of the training steps
        lr_scheduler_type=training.lr_scheduler_type,
        max_length=max_length,
        completion_only_loss=True,
        packing=False,
        include_num_input_tokens_seen="non_padding",
    )


def make_sft_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, str]],
    config: SFTConfig,
    training: TrainingParams,
    run: StageRun | None = None,
    continue_adapter: bool = False,
) -> SFTTrainer:
    """`continue_adapter`: the model carries a trainable adapter, trained further (no new LoRA)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    set_seed(config.seed)  # before the LoRA weights are drawn
    new_lora = training.use_lora and not continue_adapter
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(list(examples)),
        processing_class=tokenizer,
        peft_config=setup.lora_config(training.lora) if new_lora else None,
        callbacks=setup.tracking_callbacks(run),
    )


def fine_tune(
    *,
    stage: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, str]],
    training: TrainingParams,
    max_length: int,
    compute: ComputeParams,
    seed: int,
    checkpoint_dir: Path,
    run: StageRun | None,
    batch_key: str = BATCH_KEY,
    continue_adapter: bool = False,
) -> tuple[SFTTrainer, dict[str, Any]]:
    """Train on prompt/completion `examples`, resuming from `checkpoint_dir` after a crash: trainer and metrics.

    `continue_adapter`: `model` carries a trainable adapter, which is trained further instead of a new LoRA.
    """
    setup.apply_compute(compute)
    truncated = count_truncated(examples, tokenizer, max_length)
    if truncated:
        log.warning(
            "%s: %d of %d examples are longer than max_length %d and lose their end (the answer)",
            stage,
            truncated,
            len(examples),
            max_length,
        )
    config = sft_config(
        training,
        stage=stage,
        max_length=max_length,
        compute=compute,
        seed=seed,
        output_dir=checkpoint_dir,
        batch_key=batch_key,
    )
    trainer = make_sft_trainer(model, tokenizer, examples, config, training, run, continue_adapter=continue_adapter)
    resumed_from = checkpoints.train_resumably(trainer, checkpoint_dir)
    if run is not None and resumed_from is not None:
        run.add_budget(resumed_from_step=resumed_from)  # a fact of this run, not of its inputs
    metrics = outputs.training_metrics(trainer) | {
        "examples": len(examples),
        "truncated_examples": truncated,
        "max_length": max_length,
    }
    return trainer, metrics


def train_sft(params: Params, lang: str, run: StageRun | None = None) -> dict[str, Any]:
    """The `sft@{lang}` stage: fine-tune the base on the chains of `lang` and write the model and its metrics."""
    base = setup.require_model(paths.base_model_dir(), "base model")
    return train_from(
        params, stage_name(lang), params.sft, lang, start=base, out=paths.model_dir(f"sft-{lang}"), run=run
    )


def train_from(
    params: Params,
    stage: str,
    training: SftParams | TopupParams,
    lang: str,
    *,
    start: Path,
    out: Path,
    run: StageRun | None,
    batch_key: str = BATCH_KEY,
    recorded: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A fine-tuning stage: the model at `start` trained on `training.dataset` in `lang`, written to `out` with its
    metrics (and `recorded` before them). An adapter at `start` is trained further; a whole model gets a LoRA as
    `training.use_lora` says, or is fine-tuned whole."""
    data = paths.normalized(training.dataset, lang)
    problems = setup.read_problems(data, f"{stage.partition('@')[0]} dataset {training.dataset!r} ({lang})")
    tokenizer = loading.load_model_tokenizer(start, params)
    examples = sft_examples(problems, tokenizer, params.prompts)
    digest = checkpoints.fingerprint(
        stage,
        training.model_dump(mode="json"),
        params.prompts.model_dump(),
        params.seed,
        loading.bf16_mixed_precision(params.compute),  # a checkpoint of the other precision is not resumed
        data,
        start,
    )
    checkpoint_dir = checkpoints.checkpoint_dir(stage, digest)
    continued = loading.is_adapter(start)
    trainer, metrics = fine_tune(
        stage=stage,
        model=loading.load_model(start, params, trainable=continued),
        tokenizer=tokenizer,
        examples=examples,
        training=training,
        max_length=training.max_length_for(lang),
        compute=params.compute,
        seed=params.seed,
        checkpoint_dir=checkpoint_dir,
        run=run,
        batch_key=batch_key,
        continue_adapter=continued,
    )
    metrics = {**(recorded or {}), **metrics}
    # An adapter trained further applies to its own parent; a new LoRA applies to the model it was put on.
    parent = loading.adapter_parent(start) if continued else start
    outputs.publish_model(trainer, tokenizer, out, parent=parent)
    outputs.write_metrics(trainer, stage, metrics)
    if trainer.is_world_process_zero():
        checkpoints.remove_checkpoints(checkpoint_dir)
    return metrics
