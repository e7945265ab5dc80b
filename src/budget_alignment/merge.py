"""The `merge` stage: mergekit over the pipeline's models (RQ5: Base + the three SFT models, linear, equal weights).

Members are model names (`base`, `sft-ja`, `grpo_sft-fr`); a member stored as a LoRA adapter is applied to the
parent model it records with mergekit's `parent+adapter` syntax. Method, members, weights and method parameters
come from params (what each method needs is `params.MERGE_METHODS`), so TIES, DARE, SLERP or task arithmetic are one
params change.

GRPO models as members: the `merge` stage depends on the base and SFT models and on `data/merge_members/`, not on
the GRPO models (else every GRPO experiment would rerun the merge). For each init in `merge.grpo_inits`, stage
`merge_members@{init}` (`record_merge_members`) depends on `data/models/grpo_{init}` and writes the digests of the
members taken from it into that folder: the merge reruns when, and only when, a GRPO model it takes changes.

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
from budget_alignment.fingerprints import tree_digest
from budget_alignment.io import atomic_directory, remove_leftovers, write_json, writing
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


def record_merge_members(params: Params, init: str, run: StageRun | None = None) -> dict[str, str]:
    """Stage `merge_members@{init}`: the digest of every GRPO-from-`init` member's folder, to
    `paths.merge_members_file(init)` (what makes the merge stage depend on exactly those models)."""
    if init not in params.merge.grpo_inits:
        raise MergeError(f"merge.grpo_inits has no {init!r}: the merge takes no GRPO-from-{init} model")
    digests = {}
    for name in params.merge.members:
        if name.startswith(f"grpo_{init}-"):
            member_reference(name)  # present, safetensors, on its recorded parent
            digests[name] = tree_digest(paths.model_dir(name), contents=True)
    out = paths.merge_members_file(init)
    write_json(out, digests)
    if run is not None:
        run.add_output(out)
    return digests


def merge_configuration(params: Params) -> dict[str, Any]:
    """The mergekit YAML configuration for `params.merge`."""
    settings = params.merge
    weights = settings.weights or [1.0] * len(settings.members)
    references = [member_reference(name) for name in settings.members]
    method = MERGE_METHODS[settings.method]
    config: dict[str, Any] = {
        "merge_method": settings.method,
        "dtype": settings.dtype,
        "parameters": ({"normalize": settings.normalize} if method.weighted else {}) | settings.parameters,
    }
    members = list(zip(references, weights, strict=True))
    if method.has_base_model:
        config["base_model"] = references[0]
    if method.task_vectors:
        members = members[1:]  # the base contributes as the reference, not as a task vector
    config["models"] = [
        {"model": ref} | ({"parameters": {"weight": weight}} if method.weighted else {}) for ref, weight in members
    ]
    return config


# What mergekit's own tokenizer copy takes from its donor model.
CHAT_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def merge_models(params: Params, out: Path, run: StageRun | None = None) -> dict[str, Any]:
    """Merge the configured members into a loadable safetensors model folder at `out` (atomically)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = merge_configuration(params)
    log.info("merging %s with %s", ", ".join(params.merge.members), params.merge.method)
    adapters = paths.lora_merge_cache() / f"merge-{os.getpid()}"
    remove_leftovers(p for p in paths.lora_merge_cache().glob("merge-*") if not _alive(p.name.removeprefix("merge-")))
    options = MergeOptions(
        # mergekit takes the tokenizer of the first member of a set (its order changes with the process's hash seed),
        # re-serialized when that member is an adapter: the output would differ between runs of the same inputs.
        # Every member shares the base's tokenizer, which `_copy_chat_files` copies as it is.
        copy_tokenizer=False,
        lora_merge_cache=str(adapters),
        trust_remote_code=loading.trusts_remote_code(params),
        random_seed=params.seed,
        safe_serialization=True,
        # mergekit's card is titled with the (temporary, per-process) folder it writes and lists the members in set
        # order, which changes with the process's hash seed: the output would differ between runs of the same
        # inputs. The merge's configuration (CONFIG_FILE) says what the card would.
        write_model_card=False,
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
    """The tokenizer, chat template and generation settings of the base, byte for byte."""
    for name in CHAT_FILES:
        if (base / name).is_file():
            (out / name).write_bytes((base / name).read_bytes())
