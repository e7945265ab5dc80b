"""Where each artifact lives, relative to the repository root (`$DVC_ROOT` under DVC)."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The project root: `$DVC_ROOT` when a DVC stage runs (also under `dvc exp run --temp`), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def data_dir() -> Path:
    return Path("data")


def models_dir() -> Path:
    return data_dir() / "models"


def base_model_dir() -> Path:
    return models_dir() / "base"


def model_dir(name: str) -> Path:
    """`base`, `sft-ja`, `grpo_sft-fr`, `merge` -> their folders under data/models/."""
    if name == "base":
        return base_model_dir()
    if name == "merge":
        return models_dir() / "merged"
    kind, _, lang = name.partition("-")
    if kind == "sft":
        return models_dir() / "sft" / lang
    if kind.startswith("grpo_"):
        return models_dir() / "grpo" / f"{kind.removeprefix('grpo_')}-{lang}"
    raise ValueError(f"unknown model name {name!r}")


def cache_dir() -> Path:
    """Downloads and other reusable work that is not a pipeline output (git-ignored, kept across runs)."""
    return Path(os.environ.get("BUDGET_ALIGNMENT_CACHE") or repo_root() / ".cache")


def reports_dir() -> Path:
    return Path("reports")


def budget_file(stage: str) -> Path:
    return reports_dir() / "budget" / f"{stage}.json"
