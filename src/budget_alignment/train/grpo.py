"""Stage `grpo@{init}-{lang}`: GRPO (TRL GRPOTrainer) on the normalized math problems of one language.

`init` is where the policy starts:
- `base`: a fresh LoRA (`grpo.lora`) on the base model;
- `sft`: the model of `sft@{lang}`. An SFT adapter is loaded trainable and trained further (not re-initialized,
  so `grpo.lora` does not apply to it; the result is an adapter on the base); a fully fine-tuned SFT model gets a
  fresh `grpo.lora` adapter, whose recorded parent is that SFT model.

Every `grpo.*` param maps one to one to a `GRPOConfig` field (`grpo_config`; `clip_low` -> `epsilon`, `clip_high`
-> `epsilon_high`, `reward_weights` -> the weights of the reward functions in the same order). The rewards are
`rewards.py`'s wrappers over the scoring code. Prompts are `prompts.generation_prompt`: the chat up to an opened
`<think>`, so completions are "reasoning </think> answer". Prompts longer than `grpo.max_prompt_length` tokens are
left out (TRL no longer truncates prompts; a truncated question would be a wrong question).

Output: `data/models/grpo_{init}/{lang}/`, an adapter folder like SFT's (see `sft.py`); metrics, with the mean of
each reward over the run and the tokens generated, in `reports/train/grpo@{init}-{lang}.json`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any, Literal

from budget_alignment import loading, paths, prompts
from budget_alignment.params import ComputeParams, GrpoParams, Params, PromptParams
from budget_alignment.records import Problem
from budget_alignment.tracking import StageRun
from budget_alignment.train import checkpoints, outputs, rewards
from budget_alignment.train import trainer_setup as setup

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import GRPOConfig, GRPOTrainer

log = logging.getLogger(__name__)

Init = Literal["base", "sft"]
# The params sections the stage reads (the rewards use the scoring thresholds); dvc.yaml lists the same.
SECTIONS = ["grpo", "prompts", "scoring", "compute"]


# The param that sets GRPO's global batch (with num_generations).
BATCH_KEY = "grpo.prompts_per_step"


def stage_name(init: str, lang: str) -> str:
    return f"grpo@{init}-{lang}"


def model_name(init: str, lang: str) -> str:
    return f"grpo_{init}-{lang}"


def problems_dataset(params: Params) -> str:
    """The dataset GRPO trains on (`grpo.dataset`), which must be one with role `grpo`."""
    name = params.grpo.dataset
    if name not in params.datasets_with_role("grpo"):
        raise setup.TrainingError(
            f"grpo.dataset: {name!r} is not a dataset with role grpo ({', '.join(params.datasets_with_role('grpo'))})"
        )
    return name


def grpo_dataset(
    problems: Sequence[Problem],
    tokenizer: PreTrainedTokenizerBase,
    settings: PromptParams,
    max_prompt_length: int,
) -> Dataset:
    """One row per problem: the prompt and the columns the rewards read."""
    from datasets import Dataset

    rows = []
    for problem in problems:
        prompt = prompts.without_duplicate_bos(tokenizer, prompts.generation_prompt(tokenizer, problem, settings))
        rows.append(
            {
                "prompt": prompt,
                "answer": problem.answer,
                "answer_type": problem.answer_type,
                "choices": json.dumps(problem.choices, ensure_ascii=False) if problem.choices else "",
                "lang": problem.lang,
                "id": problem.id,
            }
        )
    lengths = [len(ids) for ids in tokenizer([row["prompt"] for row in rows])["input_ids"]]
    kept = [row for row, length in zip(rows, lengths, strict=True) if length <= max_prompt_length]
    if len(kept) < len(rows):
        log.warning(
            "%d of %d prompts are longer than max_prompt_length %d and are left out",
            len(rows) - len(kept),
            len(rows),
            max_prompt_length,
        )
    if not kept:
        raise setup.TrainingError(f"no prompt fits grpo.max_prompt_length {max_prompt_length}")
    return Dataset.from_list(kept)


def grpo_config(
    grpo: GrpoParams,
    *,
    stage: str,
    compute: ComputeParams,
    seed: int,
    output_dir: Path,
) -> GRPOConfig:
    """`grpo.*` as TRL's GRPOConfig, one field per param (reward weights in the order of `reward_weights`)."""
    from trl import GRPOConfig

    batch = setup.batch_plan(
        grpo.prompts_per_step * grpo.num_generations, grpo.per_device_batch_size, setup.world_size(), BATCH_KEY
    )
    return GRPOConfig(
        **setup.common_arguments(
            stage=stage,
            output_dir=output_dir,
            compute=compute,
            seed=seed,
            save_steps=grpo.save_steps,
            logging_steps=grpo.logging_steps,
            gradient_checkpointing=grpo.gradient_checkpointing,
        ),
        learning_rate=grpo.learning_rate,
        epsilon=grpo.clip_low,
        epsilon_high=grpo.clip_high,
        beta=grpo.beta,
        num_generations=grpo.num_generations,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
        reward_weights=list(grpo.reward_weights.values()),
        temperature=grpo.temperature,
        top_p=grpo.top_p,
        max_completion_length=grpo.max_completion_length,
        mask_truncated_completions=grpo.mask_truncated_completions,
        per_device_train_batch_size=batch.per_device,
        gradient_accumulation_steps=batch.accumulation,
        num_train_epochs=grpo.num_train_epochs,
        max_steps=grpo.max_steps,
        use_vllm=grpo.use_vllm,
        vllm_mode=grpo.vllm_mode,
        vllm_max_model_length=grpo.max_prompt_length + grpo.max_completion_length if grpo.use_vllm else None,
    )


@dataclass(frozen=True)
class Policy:
    """Where GRPO starts: the model, the LoRA to put on it (None: it carries a trainable adapter already), the folder
    it was loaded from, and the whole model the trained adapter applies to (its recorded parent)."""

    model: PreTrainedModel
    peft_config: LoraConfig | None
    start: Path
    parent: Path


def load_policy(params: Params, init: Init, lang: str) -> Policy:
    if init == "base":
        folder = setup.require_model(paths.base_model_dir(), "base model")
        return Policy(loading.load_model(folder, params), setup.lora_config(params.grpo.lora), folder, folder)
    folder = setup.require_model(paths.model_dir(f"sft-{lang}"), f"sft@{lang} model")
    if loading.is_adapter(folder):
        model = loading.load_model(folder, params, trainable=True)
        return Policy(model, None, folder, loading.adapter_parent(folder))
    return Policy(loading.load_model(folder, params), setup.lora_config(params.grpo.lora), folder, folder)


def make_grpo_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    config: GRPOConfig,
    reward_functions: Sequence[rewards.RewardFunction],
    peft_config: LoraConfig | None,
    run: StageRun | None = None,
) -> GRPOTrainer:
    from transformers import set_seed
    from trl import GRPOTrainer

    set_seed(config.seed)  # before a fresh LoRA's weights are drawn
    return GRPOTrainer(
        model=model,
        reward_funcs=list(reward_functions),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=setup.tracking_callbacks(run),
    )


def tokens_generated(log_history: Sequence[Mapping[str, Any]], generation_batch_size: int) -> int:
    """Completion tokens sampled over the run, from the logged mean completion lengths.

    Each optimizer step generates one batch of `generation_batch_size` completions; a log entry averages the
    steps since the previous one. The log history survives a resume, so the count covers the whole run.
    """
    total, previous_step = 0.0, 0
    for entry in log_history:
        if "completions/mean_length" in entry:
            total += entry["completions/mean_length"] * generation_batch_size * (entry["step"] - previous_step)
            previous_step = entry["step"]
    return round(total)


def reward_means(log_history: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """The mean of each reward (and of the weighted total) over the logged steps."""
    means = {}
    for name, key in [*((n, f"rewards/{n}/mean") for n in names), ("total", "reward")]:
        values = [entry[key] for entry in log_history if key in entry]
        if values:
            means[name] = round(fmean(values), 6)
    return means


def train_grpo(params: Params, init: Init, lang: str, run: StageRun | None = None) -> dict[str, Any]:
    """The `grpo@{init}-{lang}` stage: train the policy on the math problems of `lang`, write model and metrics."""
    stage = stage_name(init, lang)
    settings = params.grpo
    dataset_name = problems_dataset(params)
    data = paths.normalized(dataset_name, lang)
    problems = setup.read_problems(data, f"grpo dataset {dataset_name!r} ({lang})")
    policy = load_policy(params, init, lang)
    tokenizer = loading.load_model_tokenizer(policy.start, params)
    setup.apply_compute(params.compute)
    dataset = grpo_dataset(problems, tokenizer, params.prompts, settings.max_prompt_length)
    digest = checkpoints.fingerprint(
        stage,
        settings.model_dump(mode="json"),
        params.prompts.model_dump(),
        params.scoring.model_dump(mode="json"),
        params.seed,
        data,
        policy.start,
    )
    checkpoint_dir = checkpoints.checkpoint_dir(stage, digest)
    config = grpo_config(
        settings,
        stage=stage,
        compute=params.compute,
        seed=params.seed,
        output_dir=checkpoint_dir,
    )
    names = list(settings.reward_weights)
    reward_functions = rewards.build_rewards(names, params.scoring)
    trainer = make_grpo_trainer(policy.model, tokenizer, dataset, config, reward_functions, policy.peft_config, run)
    resumed_from = checkpoints.train_resumably(trainer, checkpoint_dir)
    if run is not None and resumed_from is not None:
        run.add_budget(resumed_from_step=resumed_from)  # a fact of this run, not of its inputs
    history = trainer.state.log_history
    metrics = outputs.training_metrics(trainer) | {
        "prompts": len(dataset),
        "tokens_generated": tokens_generated(history, config.generation_batch_size),
        "rewards": reward_means(history, names),
    }
    outputs.publish_model(trainer, tokenizer, paths.model_dir(model_name(init, lang)), parent=policy.parent)
    outputs.write_metrics(trainer, stage, metrics)
    if trainer.is_world_process_zero():
        checkpoints.remove_checkpoints(checkpoint_dir)
    return metrics
