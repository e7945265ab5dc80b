"""Stage `grpo@{init}-{lang}`: GRPO (TRL GRPOTrainer) on the prompts of one language (from `grpo_data`: the math
problems, or the mixture of `grpo.datasets`, each with its domain).

`init` is where the policy starts:
- `base`: a fresh LoRA (`grpo.lora`) on the base model;
- `sft`: the model of `sft@{lang}`, or its top-up (`topup@{lang}`) when the language is topped up. An adapter is
  loaded trainable and trained further (not re-initialized, so `grpo.lora` does not apply to it; the result is an
  adapter on the same parent); a whole model (a full fine-tune) gets a fresh `grpo.lora` adapter, whose recorded
  parent is that model.

Every `grpo.*` param maps one to one to a `GRPOConfig` field (`grpo_config`; `clip_low` -> `epsilon`, `clip_high`
-> `epsilon_high`, `reward_weights` -> the weights of the reward functions in the same order, with the weights the
stage's language replaces, if any). The rewards are
`rewards.py`'s wrappers over the scoring code. Prompts are `prompts.generation_prompt`: the chat up to an opened
`<think>`, so completions are "reasoning </think> answer". Prompts longer than `grpo.max_prompt_length` tokens are
left out (TRL no longer truncates prompts; a truncated question would be a wrong question).

With `grpo.beta` > 0 the loss has a KL term toward `grpo.reference` (the base, or the SFT model of the language),
through TRL's own reference mechanisms where they reach it (`use_reference`): the LoRA disabled (its parent model), or
a frozen adapter named `ref` beside the trained one (TRL's copy of a continued adapter, or the SFT adapter loaded under
that name); a whole model other than the policy's parent (the base, for a LoRA on a fully fine-tuned SFT model) is
loaded as TRL's separate `ref_model`.

Output: `data/models/grpo_{init}/{lang}/`, an adapter folder like SFT's (see `sft.py`); metrics, with the mean of
each reward over the run and the tokens generated (and with beta > 0 the reference and the mean KL), in
`reports/train/grpo@{init}-{lang}.json`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any, Literal

from budget_alignment import loading, paths, prompts
from budget_alignment.params import ComputeParams, GrpoParams, Params, PromptParams
from budget_alignment.records import GrpoProblem, Problem
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


def grpo_dataset(
    problems: Sequence[Problem],
    tokenizer: PreTrainedTokenizerBase,
    settings: PromptParams,
    max_prompt_length: int,
) -> Dataset:
    """One row per problem: the prompt and the columns the rewards read (a plain Problem is of the math domain)."""
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
                "domain": problem.domain if isinstance(problem, GrpoProblem) else "math",
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
    lang: str | None = None,
) -> GRPOConfig:
    """`grpo.*` as TRL's GRPOConfig, one field per param; the reward weights of `lang`, in the order of the rewards."""
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
        disable_dropout=grpo.disable_dropout,
        epsilon=grpo.clip_low,
        epsilon_high=grpo.clip_high,
        num_iterations=grpo.num_iterations,
        beta=grpo.beta,
        num_generations=grpo.num_generations,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
        reward_weights=list(grpo.reward_weights_for(lang).values()),
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
        vllm_server_base_url=grpo.vllm_server_url if grpo.vllm_mode == "server" else None,
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


def topup_start(lang: str) -> Path | None:
    """The top-up GRPO-from-SFT starts from in `lang`, or None when its top-up is switched off (the recipe)."""
    folder = paths.model_dir(f"topup-{lang}")
    if outputs.switched_off(folder):
        return None
    return setup.require_model(folder, f"topup@{lang} output (a model, or the marker of a language not topped up)")


def load_policy(params: Params, init: Init, lang: str) -> Policy:
    if init == "base":
        folder = setup.require_model(paths.base_model_dir(), "base model")
        return Policy(loading.load_model(folder, params), setup.lora_config(params.grpo.lora), folder, folder)
    sft_model = setup.require_model(paths.model_dir(f"sft-{lang}"), f"sft@{lang} model")
    folder = topup_start(lang) or sft_model
    if loading.is_adapter(folder):
        model = loading.load_model(folder, params, trainable=True)
        return Policy(model, None, folder, loading.adapter_parent(folder))
    return Policy(loading.load_model(folder, params), setup.lora_config(params.grpo.lora), folder, folder)


def reference_dir(params: Params, lang: str) -> Path:
    """The model the KL term pulls toward (`grpo.reference`)."""
    if params.grpo.reference == "base":
        return paths.base_model_dir()
    return setup.require_model(paths.model_dir(f"sft-{lang}"), f"sft@{lang} model (grpo.reference)")


REFERENCE_ADAPTER = "ref"  # the name TRL gives (and looks for) the frozen reference adapter


def use_reference(trainer: GRPOTrainer, policy: Policy, reference: Path, params: Params) -> str:
    """Make the KL term pull toward `reference`; how, in words.

    Before this, TRL's reference is the model the policy starts from: a fresh LoRA disabled (its parent), or a frozen
    copy named `ref` of the adapter it continues. The policy is always a LoRA (`trainer.model` a PeftModel).
    """
    model = trainer.model
    copied = REFERENCE_ADAPTER in model.peft_config
    if Path(reference) == (policy.start if copied else policy.parent):
        return "TRL's own reference: the model the policy starts from"
    if Path(reference) == policy.parent:
        model.delete_adapter(REFERENCE_ADAPTER)  # TRL then disables the LoRA: the parent model
        return "the LoRA disabled (its parent model)"
    if loading.is_adapter(reference) and loading.adapter_parent(reference) == policy.parent:
        if copied:
            model.delete_adapter(REFERENCE_ADAPTER)
        loading.require_safetensors(reference)
        model.load_adapter(str(reference), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        return "a frozen adapter on the policy's parent model"
    # Another whole model: TRL's separate reference model, prepared as TRL prepares its own.
    from trl.trainer.utils import disable_dropout_in_model

    separate = loading.load_model(reference, params).eval()
    separate.requires_grad_(False)
    if trainer.args.disable_dropout:
        disable_dropout_in_model(separate)
    trainer.ref_model = trainer.accelerator.prepare_model(separate, evaluation_mode=True)
    return "a separate reference model"


def drop_reference_adapter(trainer: GRPOTrainer) -> None:
    """The trained adapter is published alone (PEFT would save the frozen `ref` beside it)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)


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


def sampled_batches(steps: int, num_iterations: int) -> int:
    """Batches of rollouts TRL samples in optimizer steps 1..`steps`: one at steps 1, 1 + k, 1 + 2k... (k =
    `num_iterations`, the steps each batch serves)."""
    return math.ceil(steps / num_iterations)


def tokens_generated(log_history: Sequence[Mapping[str, Any]], generation_batch_size: int, num_iterations: int) -> int:
    """Completion tokens sampled over the run, from the logged mean completion lengths.

    Each sampled batch (`sampled_batches`) holds `generation_batch_size` completions; a log entry averages the
    batches sampled since the previous entry that had one. The log history survives a resume, so the count covers
    the whole run.
    """
    total, previous_step = 0.0, 0
    for entry in log_history:
        if "completions/mean_length" in entry:
            batches = sampled_batches(entry["step"], num_iterations) - sampled_batches(previous_step, num_iterations)
            total += entry["completions/mean_length"] * generation_batch_size * batches
            previous_step = entry["step"]
    return round(total)


def reward_means(log_history: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """The mean of each reward (and of the weighted total) over the logged steps.

    A reward that judges some examples only (the medical head) is NaN in a step without them: such steps are left out.
    """
    means = {}
    for name, key in [*((n, f"rewards/{n}/mean") for n in names), ("total", "reward")]:
        values = [entry[key] for entry in log_history if key in entry and math.isfinite(entry[key])]
        if values:
            means[name] = round(fmean(values), 6)
    return means


def train_grpo(params: Params, init: Init, lang: str, run: StageRun | None = None) -> dict[str, Any]:
    """The `grpo@{init}-{lang}` stage: train the policy on the math problems of `lang`, write model and metrics."""
    stage = stage_name(init, lang)
    settings = params.grpo
    data = paths.grpo_problems(lang)
    problems = setup.read_problems(data, f"GRPO prompts ({lang})", GrpoProblem, "the grpo_data stage")
    policy = load_policy(params, init, lang)
    tokenizer = loading.load_model_tokenizer(policy.start, params)
    setup.apply_compute(params.compute)
    dataset = grpo_dataset(problems, tokenizer, params.prompts, settings.max_prompt_length)
    reference = reference_dir(params, lang) if settings.beta > 0 else None
    digest = checkpoints.fingerprint(
        stage,
        settings.model_dump(mode="json"),
        params.prompts.model_dump(),
        params.scoring.model_dump(mode="json"),
        params.seed,
        loading.bf16_mixed_precision(params.compute),
        data,
        policy.start,
        *([reference] if reference else []),
    )
    checkpoint_dir = checkpoints.checkpoint_dir(stage, digest)
    config = grpo_config(
        settings,
        stage=stage,
        compute=params.compute,
        seed=params.seed,
        output_dir=checkpoint_dir,
        lang=lang,
    )
    names = settings.reward_names()
    trainer = make_grpo_trainer(
        policy.model, tokenizer, dataset, config, rewards.build_rewards(names, params.scoring), policy.peft_config, run
    )
    if reference is not None:
        log.info("%s: KL (beta %s) toward %s: %s", stage, settings.beta, reference,
                 use_reference(trainer, policy, reference, params))  # fmt: skip
    resumed_from = checkpoints.train_resumably(trainer, checkpoint_dir)
    if run is not None and resumed_from is not None:
        run.add_budget(resumed_from_step=resumed_from)  # a fact of this run, not of its inputs
    history = trainer.state.log_history
    metrics = outputs.training_metrics(trainer) | {
        "prompts": len(dataset),
        "tokens_generated": tokens_generated(history, config.generation_batch_size, config.num_iterations),
        "rewards": reward_means(history, names),
    }
    if init == "sft" and policy.start != paths.model_dir(f"sft-{lang}"):
        metrics["topup"] = policy.start.as_posix()  # started from the language's top-up
    if reference is not None:
        kl = [entry["kl"] for entry in history if "kl" in entry and math.isfinite(entry["kl"])]
        metrics |= {"reference": reference.as_posix(), "kl": round(fmean(kl), 6) if kl else None}
    drop_reference_adapter(trainer)
    outputs.publish_model(trainer, tokenizer, paths.model_dir(model_name(init, lang)), parent=policy.parent)
    outputs.write_metrics(trainer, stage, metrics)
    if trainer.is_world_process_zero():
        checkpoints.remove_checkpoints(checkpoint_dir)
    return metrics
