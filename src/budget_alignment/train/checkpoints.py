"""Resumable training: checkpoints outside the stage's output, keyed by what the run depends on.

Checkpoints go to `.cache/checkpoints/<stage>/<fingerprint>` every `save_steps` (DVC deletes a stage's output before
the stage runs, so they cannot live there). A rerun after a crash resumes from the last complete one; the fingerprint
(the params the stage reads, its input data and models) makes a changed stage start afresh instead of resuming
another run. A run removes its own checkpoints once its model is written. A checkpoint that cannot be written (a full
disk) ends the stage with an `OutputError` naming it; the complete checkpoints before it stay for the rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from budget_alignment import paths
from budget_alignment.fingerprints import sha256_file, tree_digest
from budget_alignment.io import writing

if TYPE_CHECKING:
    from transformers import Trainer

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Complete checkpoints only: the Trainer writes this file last, after weights, optimizer and RNG states.
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"


def _identity(value: Any) -> Any:
    """What makes an input the same input: file contents for small files, the folder's state for model weights."""
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


def checkpoint_dir(stage: str, digest: str) -> Path:
    return paths.checkpoints_dir(stage) / digest


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix(CHECKPOINT_PREFIX))


def is_complete(checkpoint: Path) -> bool:
    """Written to the end: the Trainer's state file, written last, is there and whole. A kill while the Trainer writes
    it (opened, truncated, then filled) leaves it empty or cut short, and resuming from it would fail on its JSON."""
    try:
        state = json.loads((checkpoint / CHECKPOINT_COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was written to the end; half-written ones (a kill during saving) are removed."""
    if not folder.is_dir():
        return None
    candidates = sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()),
        key=checkpoint_step,
    )
    complete = [p for p in candidates if is_complete(p)]
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
        restorable_cpu_device(trainer)
    # What fails inside training is a write of checkpoint-N: torch.save, safetensors, the tokenizer files.
    with writing(lambda: checkpoints / f"{CHECKPOINT_PREFIX}{trainer.state.global_step}"):
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    return checkpoint_step(last) if last else None


def restorable_cpu_device(trainer: Trainer) -> None:
    """On several CPU processes, the device `cpu` rather than accelerate's `cpu:0`.

    transformers loads a multi-process checkpoint's optimizer state with `map_location=args.device`, and torch
    cannot restore a storage to `cpu:0` ("don't know how to restore data location"): a resumed gloo run would stop.
    Both name the same device, so nothing else changes.
    """
    import torch

    device = trainer.args.device
    if trainer.args.world_size > 1 and device.type == "cpu" and device.index is not None:
        trainer.args.__dict__["_setup_devices"] = torch.device("cpu")  # the cached property's value


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
