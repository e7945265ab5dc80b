"""How SFT, the tiny base's reasoning prior and GRPO configure a trainer: devices, shared arguments, LoRA, inputs.

- **Devices.** Without a GPU the trainers get `use_cpu=True` and gradient checkpointing off (much slower on the CPU,
  for memory the CPU does not lack). bf16 mixed precision where `compute.mixed_precision` says (`loading.
  bf16_mixed_precision`: by default where the device computes bf16 itself; a CPU without it emulates bf16 and runs
  slower than in float32); on a GPU checkpointing as the params say.
- **Tracking.** The trainers report to `TrackingCallback`, which logs through the stage's run (tracking.py: a store
  that is down loses nothing), not to transformers' MLflow callback, which talks to the server itself. That
  integration is switched off in the training process (`DISABLE_MLFLOW_INTEGRATION`): with it on, TRL imports mlflow
  there at import time, seconds of each training stage's start-up for a module the process never uses (its run logs
  from a process of its own).
- Checkpoints and resuming are `checkpoints.py`'s; the written model and metrics `outputs.py`'s; one process or
  several `launch.py`'s.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from budget_alignment import loading, tracking
from budget_alignment.errors import StageError
from budget_alignment.params import ComputeParams, LoraParams
from budget_alignment.records import Problem, RecordError, read_records

if TYPE_CHECKING:
    from peft import LoraConfig

log = logging.getLogger(__name__)
P = TypeVar("P", bound=Problem)

os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")  # before anything imports TRL (see the module's docstring)


class TrainingError(StageError, RuntimeError):
    """A training stage cannot run: a missing input (data, model), an empty data set, a failed launch."""


@dataclass(frozen=True)
class BatchPlan:
    """A global batch as one process runs it: examples per device at once, accumulation steps, processes."""

    per_device: int
    accumulation: int
    processes: int

    @property
    def global_size(self) -> int:
        return self.per_device * self.accumulation * self.processes


def world_size() -> int:
    """The processes of this training run (`accelerate launch` sets WORLD_SIZE in each of them)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def batch_plan(global_size: int, max_per_device: int, processes: int, key: str) -> BatchPlan:
    """Split a global batch over the processes: as many examples per device as memory allows that divide each
    process's share, the rest by gradient accumulation. The recipe (the global batch) stays what params say."""
    if global_size % processes:
        raise TrainingError(
            f"{key}: {global_size} per step cannot be split evenly over {processes} processes (compute.num_processes)"
        )
    share = global_size // processes
    per_device = max(size for size in range(1, min(max_per_device, share) + 1) if share % size == 0)
    return BatchPlan(per_device, share // per_device, processes)


def apply_compute(compute: ComputeParams) -> None:
    if compute.torch_threads:
        import torch

        torch.set_num_threads(compute.torch_threads)


def device_arguments(compute: ComputeParams, gradient_checkpointing: bool) -> dict[str, Any]:
    """The TrainingArguments that depend on the device (see the module docstring for why)."""
    on_gpu = loading.gpu_available(compute)
    return {
        "use_cpu": not on_gpu,
        "bf16": loading.bf16_mixed_precision(compute),
        "fp16": False,
        "gradient_checkpointing": gradient_checkpointing and on_gpu,
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
        "report_to": "none",  # the stage's run takes the logs (`tracking_callbacks`)
        "disable_tqdm": not sys.stderr.isatty(),
        **device_arguments(compute, gradient_checkpointing),
    }


def tracking_callbacks(run: tracking.StageRun | None) -> list[Any]:
    """The Trainer callback that logs the training curves (loss, rewards, ...) into the stage's run, if it has one."""
    if run is None or not run.active:
        return []
    from transformers import TrainerCallback

    class TrackingCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                run.log_metrics({_metric_name(k): v for k, v in logs.items()}, step=state.global_step)

    return [TrackingCallback()]


def _metric_name(key: str) -> str:
    """A Trainer's log key as MLflow takes it (the characters transformers' MLflow callback replaced, replaced)."""
    return re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", key)


def lora_config(lora: LoraParams) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def require_model(folder: Path, what: str) -> Path:
    """A model folder that must exist before training starts (a TrainingError otherwise)."""
    try:
        return loading.require_model(folder, what)
    except loading.ModelFolderError as error:
        raise TrainingError(str(error)) from None


def read_problems(path: Path, what: str, model: type[P] = Problem, written_by: str = "the data stages") -> list[P]:
    """A training stage's problems (`model` records): present, valid, not empty."""
    if not path.is_file():
        raise TrainingError(f"{what}: {path} does not exist (run {written_by} first)")
    try:
        problems = read_records(path, model)
    except RecordError as error:
        raise TrainingError(str(error)) from None
    if not problems:
        raise TrainingError(f"{what}: {path} holds no problems")
    return problems
