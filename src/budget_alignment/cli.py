"""`budget-align`: one command per pipeline stage, each reading its parameters from params.yaml.

Heavy libraries (torch, transformers, mlflow, great-expectations) are imported inside the commands so that
`budget-align --help` starts fast.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

app = typer.Typer(
    name="budget-align",
    help="Make reasoning models think and answer in the user's language: the stages of the DVC pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsFile = Annotated[Path, typer.Option("--params", "-p", help="Parameters file (composed by DVC from conf/).")]
DEFAULT_PARAMS = Path("params.yaml")


@app.callback()
def _configure(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def fail(message: str) -> None:
    """Print a clean error (no traceback) and exit 1."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def load(params_file: Path):
    from budget_alignment.params import ParamsError, load_params

    try:
        return load_params(params_file)
    except ParamsError as error:
        fail(str(error))


@app.command("check-params")
def check_params(
    params_file: Annotated[Path, typer.Argument(help="The file to check.")] = DEFAULT_PARAMS,
) -> None:
    """Validate a params file and print every error with its key path (`grpo.clip_high: ...`)."""
    params = load(params_file)
    typer.echo(f"{params_file}: valid ({params.profile} profile, languages {', '.join(params.languages)})")


@app.command("compose-params")
def compose_params(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides, e.g. profile=paper grpo.clip_high=0.24")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the composed file.")] = DEFAULT_PARAMS,
    config_dir: Annotated[Path, typer.Option(help="Hydra config folder.")] = Path("conf"),
) -> None:
    """Compose conf/ into params.yaml exactly as `dvc exp run -S ...` does (for a plain `dvc repro`)."""
    from dvc.utils.hydra import compose_and_dump

    from budget_alignment.params import ParamsError, load_params

    if not (config_dir / "config.yaml").is_file():
        fail(f"{config_dir}/config.yaml not found")
    compose_and_dump(output, str(config_dir.resolve()), None, "config", str(config_dir.resolve()), overrides or [])
    try:
        params = load_params(output)
    except ParamsError as error:
        fail(f"the composed parameters are invalid:\n{error}")
    typer.echo(f"wrote {output} ({params.profile} profile)")


@app.command("base-model")
def base_model(params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage base_model: write the base model as a safetensors folder under data/models/base/."""
    from budget_alignment import paths, tracking
    from budget_alignment.train.base_model import ModelSourceError, materialize_base_model
    from budget_alignment.train.trainer_setup import TrainingError

    params = load(params_file)
    with tracking.stage_run("base_model", params, ["base_model", "compute"]) as run:
        try:
            materialize_base_model(params, paths.base_model_dir(), run)
        except (ModelSourceError, TrainingError) as error:
            fail(str(error))


@app.command("ingest")
def ingest(
    dataset: Annotated[str, typer.Argument(help="A dataset name from params (`datasets.<name>`).")],
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage ingest@DATASET: the English records from the dataset's source into data/ingested/."""
    from budget_alignment import tracking

    params = load(params_file)
    if dataset not in params.datasets:
        fail(f"dataset {dataset!r} is not in params (datasets: {', '.join(params.datasets)})")
    sections = [
        f"datasets.{dataset}.source",
        f"datasets.{dataset}.limit",
        "contracts.max_rejected_fraction.ingest",
        "hub_mirror",
    ]
    with tracking.stage_run(f"ingest@{dataset}", params, sections) as run:
        # Imported inside the run, so that they load while MLflow's helper process starts (tracking.py).
        from budget_alignment.data.ingest import ingest_dataset
        from budget_alignment.data.sources import SourceError
        from budget_alignment.data.validation import ContractViolation

        try:
            ingest_dataset(params, dataset, run)
        except (SourceError, ContractViolation) as error:
            fail(str(error))


Languages = Annotated[
    list[str] | None, typer.Argument(help="Only these languages (default: every language of the stage).")
]


@app.command("translate")
def translate(
    dataset: Annotated[str, typer.Argument(help="A dataset name from params (`datasets.<name>`).")],
    langs: Languages = None,
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage translate@DATASET: the human or machine translation into each language, into data/translated/DATASET/."""
    from budget_alignment import tracking
    from budget_alignment.data.translation_backends import TranslationError, check_api_keys

    params = load(params_file)
    if dataset not in params.datasets:
        fail(f"dataset {dataset!r} is not in params (datasets: {', '.join(params.datasets)})")
    for lang in langs or []:
        if lang not in params.datasets[dataset].translation:
            fail(f"datasets.{dataset}.translation has no entry for {lang!r}")
    try:
        check_api_keys(params, dataset, langs)  # before any work: a missing key costs nothing
    except TranslationError as error:
        fail(str(error))
    sections = [
        f"datasets.{dataset}.translation",
        "contracts.max_rejected_fraction.translate",
        "hub_mirror",
        "trust_remote_code",
    ]
    with tracking.stage_run(f"translate@{dataset}", params, sections) as run:
        # Imported inside the run, so that they load while MLflow's helper process starts (tracking.py).
        from budget_alignment.data.sources import SourceError
        from budget_alignment.data.translate import translate_dataset
        from budget_alignment.data.validation import ContractViolation

        try:
            translate_dataset(params, dataset, run, langs=langs)
        except (TranslationError, SourceError, ContractViolation) as error:
            fail(str(error))


@app.command("normalize")
def normalize(
    dataset: Annotated[str, typer.Argument(help="A dataset name from params (`datasets.<name>`).")],
    langs: Languages = None,
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage normalize@DATASET: cleaning and the per-language normalization rules, into data/normalized/DATASET/."""
    from budget_alignment import tracking

    params = load(params_file)
    if dataset not in params.datasets:
        fail(f"dataset {dataset!r} is not in params (datasets: {', '.join(params.datasets)})")
    for lang in langs or []:
        if lang not in params.normalize:
            fail(f"normalize has no entry for {lang!r} (languages: {', '.join(params.normalize)})")
    sections = ["normalize", "contracts.max_rejected_fraction.normalize"]
    with tracking.stage_run(f"normalize@{dataset}", params, sections) as run:
        # Imported inside the run, so that they load while MLflow's helper process starts (tracking.py).
        from budget_alignment.data.normalize import NormalizeError, normalize_dataset
        from budget_alignment.data.validation import ContractViolation

        try:
            normalize_dataset(params, dataset, run, langs=langs)
        except (NormalizeError, ContractViolation) as error:
            fail(str(error))


@app.command("sft")
def sft(
    lang: Annotated[str, typer.Argument(help="Target language (one of `languages`).")],
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage sft@LANG: fine-tune the base on the reasoning chains of LANG; writes data/models/sft/LANG/."""
    from budget_alignment import paths
    from budget_alignment.train import sft as training
    from budget_alignment.train.launch import run_stage
    from budget_alignment.train.trainer_setup import TrainingError

    params = load(params_file)
    if lang not in params.languages:
        fail(f"{lang!r} is not one of languages ({', '.join(params.languages)})")
    stage = training.stage_name(lang)
    outputs = [paths.model_dir(f"sft-{lang}"), paths.training_metrics_file(stage)]
    try:
        run_stage(
            stage,
            params,
            training.SECTIONS,
            ["sft", lang, "--params", str(params_file)],
            outputs,
            lambda run: training.train_sft(params, lang, run),
            batch_key=training.BATCH_KEY,
            full_finetune=not params.sft.use_lora,
        )
    except TrainingError as error:
        fail(str(error))


@app.command("grpo")
def grpo(
    init: Annotated[str, typer.Argument(help="Where the policy starts: base or sft.")],
    lang: Annotated[str, typer.Argument(help="Target language (one of `languages`).")],
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage grpo@INIT-LANG: GRPO on the math problems of LANG from the base or the SFT model of LANG."""
    from budget_alignment import paths
    from budget_alignment.train import grpo as training
    from budget_alignment.train.launch import run_stage
    from budget_alignment.train.trainer_setup import TrainingError

    params = load(params_file)
    if init not in ("base", "sft"):
        fail(f"INIT must be base or sft, got {init!r}")
    if lang not in params.languages:
        fail(f"{lang!r} is not one of languages ({', '.join(params.languages)})")
    stage = training.stage_name(init, lang)
    outputs = [paths.model_dir(training.model_name(init, lang)), paths.training_metrics_file(stage)]
    try:
        run_stage(
            stage,
            params,
            training.SECTIONS,
            ["grpo", init, lang, "--params", str(params_file)],
            outputs,
            lambda run: training.train_grpo(params, init, lang, run),
            batch_key=training.BATCH_KEY,
        )
    except TrainingError as error:
        fail(str(error))


@app.command("score")
def score(
    problems: Annotated[Path, typer.Argument(help="Problem records (jsonl) the completions answer.")],
    completions: Annotated[Path, typer.Argument(help="Completion records (jsonl) of one model and language.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the Score records (jsonl).")],
    metrics: Annotated[
        Path | None, typer.Option(help="Where to write the metrics JSON (default: OUT with suffix .metrics.json).")
    ] = None,
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage score: judge each completion (answer, language, format); pass@k and following rates per dataset."""
    from budget_alignment import tracking
    from budget_alignment.io import OutputError
    from budget_alignment.records import RecordError

    params = load(params_file)
    with tracking.stage_run("score", params, ["scoring", "evaluation.k"]) as run:
        # Imported inside the run, so that they load while MLflow's helper process starts (tracking.py).
        from budget_alignment.evaluation.score import ScoringError, score_files

        try:
            results = score_files(problems, completions, out, params, metrics)
        except (RecordError, ScoringError, OutputError, FileNotFoundError) as error:
            fail(str(error))
        run.add_output(out)
        run.log_metrics(tracking.flatten(results))


@app.command("merge")
def merge(params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage merge: mergekit over params.merge.members (Base + the SFT models, linear) into data/models/merge/."""
    from budget_alignment import paths, tracking
    from budget_alignment.merge import MergeError, merge_models

    params = load(params_file)
    with tracking.stage_run("merge", params, ["merge", "seed"]) as run:
        try:
            merge_models(params, paths.model_dir("merge"), run)
        except MergeError as error:
            fail(str(error))


@app.command("generate")
def generate(
    regime: Annotated[str, typer.Argument(help="base, sft, grpo_base, grpo_sft or merge.")],
    lang: Annotated[str, typer.Argument(help="The language asked in (one of `languages`, or en for the reference).")],
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage generate@REGIME-LANG: n sampled completions per evaluation problem, into data/generations/."""
    from budget_alignment import paths, tracking
    from budget_alignment.evaluation.generate import PARAM_KEYS, GenerationError, generate_for_regime
    from budget_alignment.records import RecordError

    params = load(params_file)
    if (regime, lang) not in evaluated_pairs(params):
        fail(f"{regime}-{lang} is not evaluated with these params (evaluation.regimes, languages)")
    with tracking.stage_run(f"generate@{regime}-{lang}", params, PARAM_KEYS) as run:
        try:
            generate_for_regime(params, regime, lang, paths.generations_dir(regime, lang), run)
        except (GenerationError, RecordError, FileNotFoundError) as error:
            fail(str(error))


@app.command("score-generations")
def score_generations(
    regime: Annotated[str, typer.Argument(help="base, sft, grpo_base, grpo_sft or merge.")],
    lang: Annotated[str, typer.Argument(help="The language asked in (one of `languages`, or en for the reference).")],
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage score@REGIME-LANG: `score` on every cached generation of the regime, into reports/scores/."""
    from budget_alignment import tracking
    from budget_alignment.records import RecordError

    params = load(params_file)
    if (regime, lang) not in evaluated_pairs(params):
        fail(f"{regime}-{lang} is not evaluated with these params (evaluation.regimes, languages)")
    with tracking.stage_run(f"score@{regime}-{lang}", params, ["scoring", "evaluation.k"]) as run:
        # Imported inside the run, so that they load while MLflow's helper process starts (tracking.py).
        from budget_alignment.evaluation.score import ScoringError
        from budget_alignment.evaluation.score import score_generations as score_all

        try:
            score_all(params, regime, lang, run)
        except (RecordError, ScoringError, FileNotFoundError) as error:
            fail(str(error))


@app.command("report")
def report(params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage report: reports/metrics.json, reports/report.md, the Pareto analysis and the figures."""
    from budget_alignment import tracking
    from budget_alignment.report import ReportError, build_report

    params = load(params_file)
    sections = ["report", "languages", *(f"evaluation.{k}" for k in ("datasets", "regimes", "english_reference", "k"))]
    with tracking.stage_run("report", params, sections) as run:
        try:
            build_report(params, run)
        except ReportError as error:
            fail(str(error))


def evaluated_pairs(params) -> list[tuple[str, str]]:
    from budget_alignment.report import evaluated_pairs as pairs

    return pairs(params)


# A write that fails for lack of space or permission, wherever it happens (an output, a checkpoint, a cache).
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def main() -> None:
    """The console script: a full disk or an unwritable path ends a stage with one clear line, not a traceback.

    Outputs are written atomically (io.py), so the previous output (or none) is still there, and finished work in
    caches and checkpoints is kept for the rerun.
    """
    from budget_alignment.io import OutputError

    try:
        app()
    except OSError as error:
        if not isinstance(error, OutputError) and error.errno not in WRITE_FAILURES:
            raise
        where = f"cannot write {error.filename}: {error.strerror}" if error.filename else error.strerror
        typer.secho(
            f"error: {where or error}. Free space or fix the path, then rerun: finished outputs and caches are kept.",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
