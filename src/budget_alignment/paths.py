"""Where each artifact lives, relative to the repository root (`$DVC_ROOT` under DVC): the one place that says so."""

from __future__ import annotations

import os
from pathlib import Path

REGIMES_WITH_ONE_MODEL = ("base", "merge")


def repo_root() -> Path:
    """The project root: `$DVC_ROOT` when a DVC stage runs (also under `dvc exp run --temp`), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def cache_dir() -> Path:
    """Downloads and other reusable work that is not a pipeline output (git-ignored, kept across runs)."""
    return Path(os.environ.get("BUDGET_ALIGNMENT_CACHE") or repo_root() / ".cache")


# --- models --------------------------------------------------------------------------------------------------------


def data_dir() -> Path:
    return Path("data")


def models_dir() -> Path:
    return data_dir() / "models"


def base_model_dir() -> Path:
    return models_dir() / "base"


def regime_models_dir(regime: str) -> Path:
    """The folder of a regime's models (`sft`: data/models/sft, which holds ja/, fr/, ...; `base`: the model)."""
    return models_dir() / regime


def model_dir(name: str) -> Path:
    """`base`, `merge`, `sft-ja`, `topup-ja`, `grpo_sft-fr` -> data/models/base, .../merge, .../sft/ja, .../topup/ja,
    .../grpo_sft/fr.

    One folder per regime, so a DVC stage can depend on `data/models/${regime}` for any regime.
    """
    if name in REGIMES_WITH_ONE_MODEL:
        return regime_models_dir(name)
    regime, _, lang = name.partition("-")
    if regime in ("sft", "topup", "grpo_base", "grpo_sft") and lang:
        return regime_models_dir(regime) / lang
    raise ValueError(f"unknown model name {name!r}")


def model_for(regime: str, lang: str) -> str:
    """The model a regime uses in a language: `sft` in ja is `sft-ja`; `base` and `merge` serve every language."""
    return regime if regime in REGIMES_WITH_ONE_MODEL else f"{regime}-{lang}"


def checkpoints_dir(stage: str) -> Path:
    """A training stage's checkpoints (outside its output, which DVC deletes before the stage runs)."""
    return cache_dir() / "checkpoints" / stage


def merge_members_dir() -> Path:
    """The digests of the GRPO models the merge takes, one file per init (`merge_members@{init}`): the merge stage
    depends on this folder, which git keeps (it holds a .gitignore) so that it exists when no such stage does."""
    return data_dir() / "merge_members"


def merge_members_file(init: str) -> Path:
    return merge_members_dir() / f"grpo_{init}.json"


def lora_merge_cache() -> Path:
    """Where mergekit applies LoRA adapters to their parent models."""
    return cache_dir() / "lora_merge"


# --- data ----------------------------------------------------------------------------------------------------------


def ingested(dataset: str) -> Path:
    """English records of a dataset, as loaded from its source."""
    return data_dir() / "ingested" / f"{dataset}.jsonl"


def translated(dataset: str, lang: str) -> Path:
    return data_dir() / "translated" / dataset / f"{lang}.jsonl"


def normalized(dataset: str, lang: str) -> Path:
    """What training and evaluation read: one file per dataset and language (English included)."""
    return data_dir() / "normalized" / dataset / f"{lang}.jsonl"


def grpo_problems(lang: str) -> Path:
    """GRPO's prompts in one language: the mixture of `grpo.datasets`, each problem with its domain."""
    return data_dir() / "grpo" / f"{lang}.jsonl"


# --- evaluation ----------------------------------------------------------------------------------------------------


def problems_dir(lang: str) -> Path:
    """The evaluation problems of a language, one jsonl per evaluation set (what generation and scoring read)."""
    return data_dir() / "problems" / lang


def regime_generations_dir(regime: str) -> Path:
    """The output of generate@{regime}: one folder per language it is evaluated in."""
    return data_dir() / "generations" / regime


def generations_dir(regime: str, lang: str) -> Path:
    """n completions per problem, one jsonl per evaluation set."""
    return regime_generations_dir(regime) / lang


def generation_work_dir(regime: str, lang: str) -> Path:
    """The completions of the last generation of a regime in a language, under the digest of what they depend on:
    an interrupted run resumes from them, a rerun with the same inputs reuses them (evaluation/generate.py)."""
    return cache_dir() / "generations" / f"{regime}-{lang}"


def scores_dir(regime: str, lang: str) -> Path:
    """One Score record per completion, one jsonl per evaluation set."""
    return data_dir() / "scores" / f"{regime}-{lang}"


# --- reports -------------------------------------------------------------------------------------------------------


def reports_dir() -> Path:
    return Path("reports")


def budget_file(stage: str) -> Path:
    """A stage's run facts (wall time, memory, tokens): not a pipeline output, read by no stage."""
    return reports_dir() / "budget" / f"{stage}.json"


def training_metrics_file(stage: str) -> Path:
    """A training stage's DVC metrics: steps, losses, tokens."""
    return reports_dir() / "train" / f"{stage}.json"


def score_metrics_file(regime: str, lang: str) -> Path:
    """A score stage's metrics per evaluation set (pass@k, following, ...)."""
    return reports_dir() / "scores" / f"{regime}-{lang}.json"


def report_file() -> Path:
    return reports_dir() / "report.md"


def report_metrics_file() -> Path:
    return reports_dir() / "metrics.json"


def compare_report() -> Path:
    """`budget-align compare`'s table of every experiment (its figure beside it): a view, no stage's output."""
    return reports_dir() / "compare.md"


def figures_dir() -> Path:
    return reports_dir() / "figures"


def plots_dir() -> Path:
    return reports_dir() / "plots"


def data_quality_dir() -> Path:
    return reports_dir() / "data_quality"


# --- data quality and translation


def _part(stage: str) -> Path:
    """A data stage's part for one dataset, `translate@chains`, as a folder: `translate/chains` (one data stage runs
    over every dataset, and its outputs hold one folder per dataset)."""
    name, _, dataset = stage.partition("@")
    return Path(name, dataset)


def data_quality_reports(stage: str) -> Path:
    """A data stage's contract reports of a dataset, one JSON per language: reports/data_quality/translate/chains/."""
    return data_quality_dir() / _part(stage)


def data_quality_report(stage: str, lang: str) -> Path:
    return data_quality_reports(stage) / f"{lang}.json"


def rejected_dir(stage: str) -> Path:
    """A data stage's quarantined records of a dataset, one jsonl per language: data_quality/rejected/ingest/math/."""
    return data_quality_dir() / "rejected" / _part(stage)


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


# --- tracking


def tracking_outbox() -> Path:
    """What stages could not log to MLflow (an outage), kept until a later stage or `budget-align sync-tracking` sends
    it: one journal per stage run, and the artifacts it holds."""
    return cache_dir() / "tracking" / "outbox"


def tracking_relay() -> Path:
    """Where the ranks of a re-launched training stage leave their metrics for the process that holds the run."""
    return cache_dir() / "tracking" / "relay"
