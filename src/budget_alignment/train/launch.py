"""Running a training stage in one process or several (`accelerate launch`), tracked in one MLflow run.

With more than one process (`compute.num_processes`, `auto`: one per visible GPU) a stage command re-launches itself
under `accelerate launch`; the launching process owns the MLflow run (rank 0's metrics reach it through a relay file,
`tracking.StageRun.relay`), rank 0 writes the outputs. The recipe's global batches are checked against the process
count before anything starts. The launch config: data parallel for LoRA and on the CPU, FSDP or ZeRO-3
(`compute.sharding`) for a full fine-tune on GPUs, unless `compute.accelerate_config` names one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from budget_alignment import loading, paths, tracking
from budget_alignment.params import ComputeParams, Params, split_errors
from budget_alignment.train.outputs import budget_figures
from budget_alignment.train.trainer_setup import TrainingError

log = logging.getLogger(__name__)


def die_with_parent() -> Callable[[], None]:
    """A function that makes the calling process get SIGKILL when its parent dies (Linux; a no-op elsewhere).

    torch's elastic agent starts each rank in a session of its own, so a kill of the stage's process group (`kill -9`,
    the OOM killer, a job scheduler's cancel of `dvc repro`) would leave the ranks training on, orphaned, writing
    checkpoints beside the rerun's. Resolved before any fork: the result is safe to call in `preexec_fn`.
    """
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)


def in_distributed_launch() -> bool:
    """Inside `accelerate launch` / torchrun with several processes (they set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


ACCELERATE_CONFIGS = Path("conf/accelerate")


def process_count(compute: ComputeParams) -> int:
    """`compute.num_processes`, with `auto` as one process per visible GPU (one without a GPU)."""
    if compute.num_processes != "auto":
        return compute.num_processes
    if not loading.gpu_available(compute):
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def accelerate_config(compute: ComputeParams, full_finetune: bool) -> str:
    """The launch config: the params' own, else DDP, or the sharding of `compute.sharding` for a full fine-tune on
    GPUs (a 7B model and its optimizer state do not fit one GPU)."""
    if compute.accelerate_config != "auto":
        return compute.accelerate_config
    sharded = full_finetune and loading.gpu_available(compute)
    return str(ACCELERATE_CONFIGS / f"{compute.sharding if sharded else 'ddp'}.yaml")


def relaunch_command(compute: ComputeParams, argv: Iterable[str], *, full_finetune: bool = False) -> list[str]:
    """`accelerate launch` of this CLI with the same command, one process per device."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        accelerate_config(compute, full_finetune),
        "--num_processes",
        str(process_count(compute)),
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
    *,
    batch_key: str,
    full_finetune: bool = False,
) -> None:
    """Run a training stage: tracked in one MLflow run, in one process or re-launched under `accelerate launch`.

    `argv` is the CLI command that runs this stage (for the re-launch); `train(run)` trains, writes `outputs`
    (rank 0) and returns the stage's metrics. `batch_key` names the param of the stage's global batch, checked
    against the process count before anything starts; `full_finetune` picks a sharded launch config on GPUs.
    """
    if in_distributed_launch():
        # A rank of a re-launched stage: the launching process owns the run; rank 0 logs into it through the relay.
        parent = os.getppid()
        die_with_parent()()
        if os.getppid() != parent:  # the launcher died before the line above
            os._exit(1)
        train(tracking.rank_run(stage))
        return
    processes = process_count(params.compute)
    errors = split_errors(params, processes, [batch_key])
    if errors:
        raise TrainingError("; ".join(errors))
    with tracking.stage_run(stage, params, sections) as run:
        if processes > 1:
            command = relaunch_command(params.compute, argv, full_finetune=full_finetune)
            log.info("launching %d processes: %s", processes, " ".join(command))
            with run.relay() as relay:
                result = subprocess.run(
                    command, env={**os.environ, **relay}, check=False, preexec_fn=die_with_parent()
                )
            if result.returncode != 0:
                raise TrainingError(f"{stage}: `accelerate launch` exited with status {result.returncode}")
            metrics = json.loads(paths.training_metrics_file(stage).read_text(encoding="utf-8"))
        else:
            metrics = train(run)
        run.add_budget(**budget_figures(metrics))
        run.log_metrics({f"train.{k}": v for k, v in metrics.items() if k != "stage"})
        for output in outputs:
            run.add_output(output)
