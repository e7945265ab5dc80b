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
    """`base`, `merge`, `sft-ja`, `grpo_sft-fr` -> data/models/base, .../merge, .../sft/ja, .../grpo_sft/fr.

    One folder per regime, so a DVC stage can depend on `data/models/${regime}` for any regime.
    """
    if name in ("base", "merge"):
        return models_dir() / name
    regime, _, lang = name.partition("-")
    if regime in ("sft", "grpo_base", "grpo_sft") and lang:
        return models_dir() / regime / lang
    raise ValueError(f"unknown model name {name!r}")


def cache_dir() -> Path:
    """Downloads and other reusable work that is not a pipeline output (git-ignored, kept across runs)."""
    return Path(os.environ.get("BUDGET_ALIGNMENT_CACHE") or repo_root() / ".cache")


def reports_dir() -> Path:
    return Path("reports")


def budget_file(stage: str) -> Path:
    return reports_dir() / "budget" / f"{stage}.json"


def ingested(dataset: str) -> Path:
    """English records of a dataset, as loaded from its source."""
    return data_dir() / "ingested" / f"{dataset}.jsonl"


def translated(dataset: str, lang: str) -> Path:
    return data_dir() / "translated" / dataset / f"{lang}.jsonl"


def normalized(dataset: str, lang: str) -> Path:
    """What training and evaluation read: one file per dataset and language (English included)."""
    return data_dir() / "normalized" / dataset / f"{lang}.jsonl"


def data_quality_dir() -> Path:
    return reports_dir() / "data_quality"


# --- data quality and translation


def data_quality_reports(stage: str) -> Path:
    """A data stage instance's contract reports, one JSON per language: reports/data_quality/translate@chains/."""
    return data_quality_dir() / stage


def data_quality_report(stage: str, lang: str) -> Path:
    return data_quality_reports(stage) / f"{lang}.json"


def rejected_dir(stage: str) -> Path:
    """A data stage instance's quarantined records, one jsonl per language: data_quality/rejected/ingest@math/."""
    return data_quality_dir() / "rejected" / stage


def rejected_records(stage: str, lang: str) -> Path:
    return rejected_dir(stage) / f"{lang}.jsonl"


def data_docs_dir() -> Path:
    """The great-expectations Data Docs site: a view rebuilt by every data stage, not a pipeline output."""
    return data_quality_dir() / "docs"


def translations_dir(dataset: str) -> Path:
    return data_dir() / "translated" / dataset


def normalized_dir(dataset: str) -> Path:
    return data_dir() / "normalized" / dataset


def translation_cache() -> Path:
    """Machine translations of chunks, reused across runs (not an output: it keeps timestamps)."""
    return cache_dir() / "translations" / "cache.sqlite"
