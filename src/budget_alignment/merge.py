"""The `merge` stage: mergekit over the pipeline's models (RQ5: Base + the three SFT models, linear, equal weights).

Members are model names (`base`, `sft-ja`, `grpo_sft-fr`); a member stored as a LoRA adapter is applied to the
parent model it records with mergekit's `parent+adapter` syntax. Method, members, weights and method parameters
come from params (what each method needs is `params.MERGE_METHODS`), so TIES, DARE or SLERP are one params change.

mergekit applies an adapter to its parent into a cache folder that it reuses whenever the folder exists, complete or
not; a merge killed or stopped by a full disk while writing it would leave a broken model for every later merge. So
each merge applies adapters in a folder of its own (under `paths.lora_merge_cache()`), removed when it ends. A write
that fails (a full disk) ends the stage with one `OutputError` naming the output; the previous output stays.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from budget_alignment import loading, paths
from budget_alignment.errors import StageError
from budget_alignment.io import atomic_directory, remove_leftovers, writing
from budget_alignment.params import MERGE_METHODS, Params
from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)

CONFIG_FILE = "merge_config.yaml"


class MergeError(StageError, RuntimeError):
    """A member is missing or mergekit refused the configuration."""


def member_reference(name: str) -> str:
    """What mergekit loads for a member: a model folder, or `parent+adapter` for a LoRA adapter."""
    folder = paths.model_dir(name)
    try:
        loading.require_model(folder, f"merge.members: {name!r}")
        loading.require_safetensors(folder)
        if loading.is_adapter(folder):
            return f"{loading.weights_folder(folder)}+{folder}"
    except loading.ModelFolderError as error:
        raise MergeError(str(error)) from None
    except loading.UnsafeModelError as error:
        raise MergeError(f"merge.members: {name!r}: {error}") from None
    return str(folder)


def merge_configuration(params: Params) -> dict[str, Any]:
    """The mergekit YAML configuration for `params.merge`."""
    settings = params.merge
    weights = settings.weights or [1.0] * len(settings.members)
    references = [member_reference(name) for name in settings.members]
    config: dict[str, Any] = {
        "merge_method": settings.method,
        "dtype": settings.dtype,
        # Every method but SLERP (an interpolation) takes `normalize`.
        "parameters": ({} if settings.method == "slerp" else {"normalize": settings.normalize}) | settings.parameters,
    }
    members = list(zip(references, weights, strict=True))
    method = MERGE_METHODS[settings.method]
    if method.has_base_model:
        config["base_model"] = references[0]
    if method.task_vectors:
        members = members[1:]  # the base contributes as the reference, not as a task vector
    config["models"] = [{"model": ref, "parameters": {"weight": weight}} for ref, weight in members]
    if settings.method == "slerp":
        config["models"] = [{"model": ref} for ref, _ in members]
    return config


def merge_models(params: Params, out: Path, run: StageRun | None = None) -> dict[str, Any]:
    """Merge the configured members into a loadable safetensors model folder at `out` (atomically)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = merge_configuration(params)
    log.info("merging %s with %s", ", ".join(params.merge.members), params.merge.method)
    adapters = paths.lora_merge_cache() / f"merge-{os.getpid()}"
    remove_leftovers(p for p in paths.lora_merge_cache().glob("merge-*") if not _alive(p.name.removeprefix("merge-")))
    options = MergeOptions(
        copy_tokenizer=True,
        lora_merge_cache=str(adapters),
        trust_remote_code=loading.trusts_remote_code(params),
        random_seed=params.seed,
        safe_serialization=True,
        write_model_card=True,
        quiet=True,
    )
    try:
        merge_config = MergeConfiguration.model_validate(config)
    except ValueError as error:
        raise MergeError(f"mergekit rejected the configuration built from params.merge: {error}") from None
    try:
        with writing(out), atomic_directory(out) as tmp:
            run_merge(merge_config, str(tmp), options=options)
            _copy_chat_files(paths.base_model_dir(), tmp)
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    finally:
        shutil.rmtree(adapters, ignore_errors=True)
    if run is not None:
        run.add_output(out)
        run.log_artifact(out / CONFIG_FILE)
    return config


def _alive(pid: str) -> bool:
    """Whether the merge that made a folder named after its process id may still be running."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _copy_chat_files(base: Path, out: Path) -> None:
    """mergekit copies the tokenizer; the chat template and generation settings come from the base too."""
    for name in ("chat_template.jinja", "generation_config.json"):
        if (base / name).is_file() and not (out / name).exists():
            (out / name).write_bytes((base / name).read_bytes())
