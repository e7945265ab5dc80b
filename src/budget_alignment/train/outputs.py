"""What a training stage writes: the trained model (an adapter on its recorded parent, or a whole model) and its
metrics.

A LoRA model is written as the PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`) plus the
tokenizer; `adapter_config.json` records the model it was trained on (`loading.adapter_parent`). A full fine-tune is a
whole safetensors model folder. `loading.load_model` loads either.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from budget_alignment import loading, paths
from budget_alignment.io import atomic_directory, write_json, writing

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer

log = logging.getLogger(__name__)

# Files the Trainer leaves in a saved model folder that a published model does not carry: the training arguments
# (a pickle, which the project never loads) and PEFT's empty model card template.
UNPUBLISHED_FILES = ("training_args.bin", "README.md")


def publish_model(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, out: Path, parent: Path) -> None:
    """Write the trained model (adapter or whole model) and its tokenizer to `out`, atomically.

    `parent` is the whole model the training started from; an adapter records it. Every rank takes part in saving
    (FSDP and ZeRO-3 gather the weights), rank 0 writes.
    """
    staging = out.parent / f".{out.name}.staging"
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    try:
        with writing(out):
            trainer.save_model(str(staging))
            trainer.accelerator.wait_for_everyone()
            if not main:
                return
            tokenizer.save_pretrained(staging)
            for name in UNPUBLISHED_FILES:
                (staging / name).unlink(missing_ok=True)
            if loading.is_adapter(staging):
                loading.record_adapter_parent(staging, parent)
            with atomic_directory(out) as building:
                for entry in staging.iterdir():
                    entry.replace(building / entry.name)
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)  # a half-written model is no use to anyone
    log.info("model written to %s", out)


# A training stage its params switch off (a language without a top-up) writes this file alone in place of a model. Its
# content never changes, so the stages that depend on the folder see no change while the switch stays off.
SWITCHED_OFF = "switched_off.json"


def publish_switched_off(out: Path) -> None:
    """Write the switched-off marker as the stage's whole output, atomically."""
    with atomic_directory(out) as building:
        write_json(building / SWITCHED_OFF, {"trained": False})
    log.info("switched off: %s holds no model", out)


def switched_off(folder: Path) -> bool:
    """Whether `folder` is a switched-off stage's output (its marker alone, no model)."""
    return (
        (folder / SWITCHED_OFF).is_file() and not loading.is_adapter(folder) and not (folder / "config.json").exists()
    )


def training_metrics(trainer: Trainer) -> dict[str, Any]:
    """What every training stage reports: steps, epochs, the logged losses and the tokens trained on.

    All of them follow from the inputs (training is seeded), so they belong in the stage's DVC metrics.
    """
    state = trainer.state
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return {
        "global_step": state.global_step,
        # Examples (SFT) or completions (GRPO) per optimizer step over all processes: the recipe's batch.
        "global_batch_size": trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size,
        "epoch": round(state.epoch or 0.0, 4),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        # The mean of every logged loss: the trainer's own `train_loss` counts only the steps since a resume, so a
        # resumed run would report another figure than the uninterrupted one.
        "train_loss": sum(losses) / len(losses) if losses else None,
        "tokens_trained": int(state.num_input_tokens_seen or 0),
    }


def write_metrics(trainer: Trainer, stage: str, metrics: Mapping[str, Any]) -> None:
    if trainer.is_world_process_zero():
        write_json(paths.training_metrics_file(stage), {"stage": stage, **metrics})


BUDGET_KEYS = ("tokens_trained", "tokens_generated")


def budget_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {key: metrics[key] for key in BUDGET_KEYS if metrics.get(key) is not None}
