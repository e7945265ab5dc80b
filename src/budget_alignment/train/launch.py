"""Running a training stage in one process or several (`accelerate launch`), tracked in one MLflow run.

With `compute.num_processes > 1` a stage command re-launches itself under `accelerate launch`; the launching process
owns the MLflow run (the ranks log into it through `MLFLOW_RUN_ID`), rank 0 writes the outputs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from budget_alignment import paths, tracking
from budget_alignment.params import ComputeParams, Params
from budget_alignment.train.outputs import budget_figures
from budget_alignment.train.trainer_setup import TrainingError

log = logging.getLogger(__name__)


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
            metrics = json.loads(paths.training_metrics_file(stage).read_text(encoding="utf-8"))
        else:
            metrics = train(run)
        run.add_budget(**budget_figures(metrics))
        run.log_metrics({f"train.{k}": v for k, v in metrics.items() if k != "stage"})
        for output in outputs:
            run.add_output(output)
