"""What SFT, the tiny base's reasoning prior and GRPO share: devices, seeds, LoRA, checkpoints, outputs, launching.

- **Devices.** Without a GPU the trainers get `use_cpu=True, bf16=False` (TRL turns bf16 on by default and then
  refuses or runs 2.8x slower on the CPU) and gradient checkpointing off (2.5x slower on the CPU, for memory the CPU
  does not lack). On a GPU, bf16 mixed precision where the GPU supports it, and checkpointing as the params say.
- **Checkpoints** go to `.cache/checkpoints/<stage>/<fingerprint>`, outside the stage's DVC output (DVC deletes an
  output before its stage runs), every `save_steps`. A rerun after a crash resumes from the last complete one; the
  fingerprint (the params the stage reads, its input data and models) makes sure a changed stage starts afresh
  instead of resuming another run. A run removes its own checkpoints once its model is written.
- **Outputs.** A LoRA model is written as the PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`)
  plus the tokenizer; its `base_model_name_or_path` is the folder of the model it applies to (relative to the
  repository root). A full fine-tune is a whole safetensors model folder. `load_model` loads either.
- **Processes.** With `compute.num_processes > 1` a stage command re-launches itself under `accelerate launch`; the
  launching process owns the MLflow run (the ranks log into it through `MLFLOW_RUN_ID`), rank 0 writes the outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from budget_alignment import loading, paths, tracking
from budget_alignment.fingerprints import sha256_file, tree_digest
from budget_alignment.io import atomic_directory, write_json
from budget_alignment.params import ComputeParams, LoraParams, Params

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_PREFIX = "checkpoint-"
# Complete checkpoints only: the Trainer writes this file last, after weights, optimizer and RNG states.
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"
# Files the Trainer leaves in a saved model folder that a published model does not carry: the training arguments
# (a pickle, which the project never loads) and PEFT's empty model card template.
UNPUBLISHED_FILES = ("training_args.bin", "README.md")


class TrainingError(RuntimeError):
    """A training stage cannot run: a missing input (data, model), an empty data set, a failed launch."""


# --- devices and seeds ---------------------------------------------------------------------------------------------


def gpu_available(compute: ComputeParams) -> bool:
    if compute.device == "cpu":
        return False
    import torch

    available = torch.cuda.is_available()
    if compute.device == "cuda" and not available:
        raise TrainingError("compute.device is cuda, but no CUDA GPU is visible")
    return available


def apply_compute(compute: ComputeParams) -> None:
    if compute.torch_threads:
        import torch

        torch.set_num_threads(compute.torch_threads)


def device_arguments(compute: ComputeParams, gradient_checkpointing: bool) -> dict[str, Any]:
    """The TrainingArguments that depend on the device (see the module docstring for why)."""
    if not gpu_available(compute):
        return {"use_cpu": True, "bf16": False, "fp16": False, "gradient_checkpointing": False}
    import torch

    return {
        "use_cpu": False,
        "bf16": torch.cuda.is_bf16_supported(),
        "fp16": False,
        "gradient_checkpointing": gradient_checkpointing,
    }


def common_arguments(
    *,
    stage: str,
    output_dir: Path,
    compute: ComputeParams,
    seed: int,
    save_steps: int,
    logging_steps: int,
    gradient_checkpointing: bool,
    report_to: str | list[str],
) -> dict[str, Any]:
    """TrainingArguments every training stage sets the same way (its own hyper-parameters come on top)."""
    return {
        "output_dir": str(output_dir),
        "run_name": stage,
        "seed": seed,
        "data_seed": seed,
        "save_strategy": "steps",
        "save_steps": save_steps,
        # Two, so that the previous complete checkpoint survives a crash while the next one is being written.
        "save_total_limit": 2,
        "logging_steps": logging_steps,
        "report_to": report_to,
        "disable_tqdm": not sys.stderr.isatty(),
        **device_arguments(compute, gradient_checkpointing),
    }


def report_to(run: tracking.StageRun | None) -> list[str] | str:
    """`mlflow` when the stage has an MLflow run (the Trainer's callback joins it through `MLFLOW_RUN_ID`)."""
    return ["mlflow"] if run is not None and run.share_with_trainers() else "none"


def lora_config(lora: LoraParams) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


# --- models --------------------------------------------------------------------------------------------------------


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: Path) -> Path:
    """The model folder a LoRA adapter applies to."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return Path(config["base_model_name_or_path"])


def require_model(folder: Path, what: str) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file() and not is_adapter(folder):
        raise TrainingError(f"{what}: no model at {folder} (run its stage first)")
    return folder


def load_model(folder: Path, params: Params, *, trainable: bool = False) -> PreTrainedModel:
    """A model folder or a LoRA adapter folder (on top of the model it names), ready to train or generate.

    `trainable` leaves an adapter's weights trainable (GRPO from SFT continues the SFT adapter). Safetensors only;
    remote code only when params trust the base model (loading.py).
    """
    import torch

    folder = require_model(folder, "model")
    if is_adapter(folder):
        return loading.load_adapter(load_model(adapter_base(folder), params), folder, trainable=trainable)
    dtype = getattr(torch, params.base_model.dtype)
    return loading.load_causal_lm(
        folder,
        dtype,
        trust_remote_code=loading.trusts_remote_code(params),
        on_cpu=not gpu_available(params.compute),
    )


def without_duplicate_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """A rendered chat prompt without its leading BOS token when the tokenizer adds one by itself.

    Chat templates such as R1-Distill's write `{{bos_token}}` into the text, and TRL tokenizes text prompts with the
    special tokens on: every sequence would start with two BOS tokens.
    """
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return text[len(bos) :]
    return text


def load_tokenizer(folder: Path, params: Params) -> PreTrainedTokenizerBase:
    tokenizer = loading.load_tokenizer(folder, trust_remote_code=loading.trusts_remote_code(params))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- checkpoints ---------------------------------------------------------------------------------------------------


def _identity(value: Any) -> Any:
    """What makes an input the same input: file contents for small files, name/size/mtime for model weights."""
    if isinstance(value, Path):
        if value.is_file():
            return {"file": str(value), "sha256": sha256_file(value)}
        if value.is_dir():
            # Weights are large; a changed size or mtime (rewritten by DVC, retrained) only costs a fresh start.
            return {"dir": str(value), "state": tree_digest(value, contents=False)}
        return {"missing": str(value)}
    return value


def fingerprint(*parts: Any) -> str:
    """A short digest of a stage's settings and inputs (Paths stand for their files)."""
    payload = json.dumps([_identity(part) for part in parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def checkpoint_root(stage: str) -> Path:
    return paths.cache_dir() / "checkpoints" / stage


def checkpoint_dir(stage: str, digest: str) -> Path:
    return checkpoint_root(stage) / digest


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix(CHECKPOINT_PREFIX))


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was written to the end; half-written ones (a kill during saving) are removed."""
    if not folder.is_dir():
        return None
    candidates = sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()),
        key=checkpoint_step,
    )
    complete = [p for p in candidates if (p / CHECKPOINT_COMPLETE_MARKER).is_file()]
    for partial in set(candidates) - set(complete):
        log.warning("removing the incomplete checkpoint %s", partial)
        shutil.rmtree(partial, ignore_errors=True)
    return complete[-1] if complete else None


def train_resumably(trainer: Trainer, checkpoints: Path) -> int | None:
    """Train, resuming from the last complete checkpoint in `checkpoints`; returns the step resumed from."""
    state = trainer.accelerator.state
    log.info("training on %d processes (%s)", state.num_processes, state.distributed_type.value)
    last = last_complete_checkpoint(checkpoints) if trainer.is_world_process_zero() else None
    last = broadcast(trainer, last)
    if last is not None:
        log.info("resuming from %s (step %d)", last, checkpoint_step(last))
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    return checkpoint_step(last) if last else None


def broadcast(trainer: Trainer, value: Any) -> Any:
    """Rank 0's `value` on every rank (one process: unchanged)."""
    if trainer.accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def remove_checkpoints(checkpoints: Path) -> None:
    """After success: this run's checkpoints (others of the stage may belong to a run still going elsewhere)."""
    shutil.rmtree(checkpoints, ignore_errors=True)
    with contextlib.suppress(OSError):
        checkpoints.parent.rmdir()  # the stage's folder, once empty


# --- outputs -------------------------------------------------------------------------------------------------------


def publish_model(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Write the trained model (adapter or whole model) and its tokenizer to `out`, atomically.

    Every rank takes part in saving (FSDP and ZeRO-3 gather the weights), rank 0 writes.
    """
    staging = out.parent / f".{out.name}.staging"
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if not main:
        return
    tokenizer.save_pretrained(staging)
    for name in UNPUBLISHED_FILES:
        (staging / name).unlink(missing_ok=True)
    with atomic_directory(out) as building:
        for entry in staging.iterdir():
            entry.replace(building / entry.name)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("model written to %s", out)


def metrics_file(stage: str) -> Path:
    """A training stage's DVC metrics: reports/train/<stage>.json."""
    return paths.reports_dir() / "train" / f"{stage}.json"


def training_metrics(trainer: Trainer, resumed_from: int | None) -> dict[str, Any]:
    """What every training stage reports: steps, epochs, the final logged loss and the tokens trained on."""
    state = trainer.state
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    summary = next((entry for entry in reversed(state.log_history) if "train_loss" in entry), {})
    return {
        "global_step": state.global_step,
        "epoch": round(state.epoch or 0.0, 4),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_loss": summary.get("train_loss"),
        "resumed_from_step": resumed_from,
        "tokens_trained": int(state.num_input_tokens_seen or 0),
    }


def write_metrics(trainer: Trainer, stage: str, metrics: Mapping[str, Any]) -> None:
    if trainer.is_world_process_zero():
        write_json(metrics_file(stage), {"stage": stage, **metrics})


BUDGET_KEYS = ("tokens_trained", "tokens_generated")


def budget_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {key: metrics[key] for key in BUDGET_KEYS if metrics.get(key) is not None}


# --- running a stage, in one process or several --------------------------------------------------------------------


def in_distributed_launch() -> bool:
    """Inside `accelerate launch` / torchrun with several processes (they set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch_command(compute: ComputeParams, argv: Iterable[str]) -> list[str]:
    """`accelerate launch` of this CLI with the same command, one process per device."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        compute.accelerate_config,
        "--num_processes",
        str(compute.num_processes),
        "-m",
        "budget_alignment.cli",
        *argv,
    ]


def run_stage(
    stage: str,
    params: Params,
    sections: list[str],
    argv: list[str],
    outputs: list[Path],
    train: Callable[[tracking.StageRun | None], Mapping[str, Any]],
) -> None:
    """Run a training stage: tracked in one MLflow run, in one process or re-launched under `accelerate launch`.

    `argv` is the CLI command that runs this stage (for the re-launch); `train(run)` trains, writes `outputs`
    (rank 0) and returns the stage's metrics.
    """
    if in_distributed_launch():
        # A rank of a re-launched stage: the launching process owns the run; the ranks' Trainers log into it.
        run_id = os.environ.get("MLFLOW_RUN_ID")
        train(tracking.StageRun(tracking.stage_name(stage), run_id) if run_id else None)
        return
    with tracking.stage_run(stage, params, sections) as run:
        if params.compute.num_processes > 1:
            run.share_with_trainers()  # the ranks' Trainers join this run
            command = relaunch_command(params.compute, argv)
            log.info("launching %d processes: %s", params.compute.num_processes, " ".join(command))
            result = subprocess.run(command, check=False)
            if result.returncode != 0:
                raise TrainingError(f"{stage}: `accelerate launch` exited with status {result.returncode}")
            metrics = json.loads(metrics_file(stage).read_text(encoding="utf-8"))
        else:
            metrics = train(run)
        run.add_budget(**budget_figures(metrics))
        run.log_metrics({f"train.{k}": v for k, v in metrics.items() if k != "stage"})
        for output in outputs:
            run.add_output(output)
