"""`budget-align`: one command per pipeline stage (`stages.py` names each stage's command, module and params keys),
and the tools around the pipeline (check-params, compose-params, score-files, budget, compare, ui, plan,
sync-tracking).

Every stage command has one skeleton (`tracked_stage`): params loaded and validated, the stage instance checked, the
stage's MLflow run opened with the params keys it reads, its libraries imported inside the run (so they load while
MLflow's helper process starts, and `budget-align --help` stays fast). Every failure a user can act on
(`errors.StageError`, a write that fails for lack of space or permission) ends the command with one clear message and
exit status 1, never a traceback (`main`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import typer.core

from budget_alignment.errors import StageError

if TYPE_CHECKING:
    from budget_alignment.params import Params
    from budget_alignment.tracking import StageRun

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


class OneLineErrors(typer.core.TyperGroup):
    """Every command: a failure a user can act on ends with its message and status 1, not a traceback.

    Outputs are written atomically (io.py), so the previous output (or none) is still there, and finished work in
    caches and checkpoints is kept for the rerun.
    """

    def invoke(self, ctx):
        from budget_alignment.io import write_failure

        try:
            return super().invoke(ctx)
        except StageError as error:
            fail(str(error))
        except Exception as error:
            # Stages name the path (io.writing); a write no stage wrapped still ends in one line, with its cause.
            failure = write_failure(error)
            if failure is None:
                raise
            fail(f"{failure.strerror}. Free space or fix the path, then rerun: finished outputs and caches are kept.")


app = typer.Typer(
    cls=OneLineErrors,
    name="budget-align",
    help="Make reasoning models think and answer in the user's language: the stages of the DVC pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsFile = Annotated[Path, typer.Option("--params", "-p", help="Parameters file (composed by DVC from conf/).")]
DEFAULT_PARAMS = Path("params.yaml")
Lang = Annotated[str, typer.Argument(help="A target language (one of `languages`).")]
Regime = Annotated[str, typer.Argument(help="base, sft, grpo_base, grpo_sft or merge.")]
Langs = Annotated[
    list[str] | None, typer.Argument(help="Only these languages (default: all of the stage).", show_default=False)
]
Datasets = Annotated[
    list[str] | None, typer.Argument(help="Only these datasets (default: every one of params).", show_default=False)
]
LangOption = Annotated[
    list[str] | None,
    typer.Option(
        "--lang",
        "-l",
        help="Only this language (repeatable; default: every language of the stage).",
        show_default=False,
    ),
]


@app.callback()
def _configure(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# --- the skeleton of every stage command ---------------------------------------------------------------------------


def stage_keys(name: str, params: Params, **instance: str) -> list[str]:
    """The params keys a stage instance reads (stages.py), with the tiny base's prior dataset filled in."""
    from budget_alignment.stages import STAGES

    prior = params.base_model.reasoning_prior
    keys = STAGES[name].keys(**instance, prior=prior.dataset if prior else "{prior}")
    return [key for key in keys if "{prior}" not in key]


def instance_name(name: str, **instance: str) -> str:
    """`grpo` with init sft and lang ja -> `grpo@sft-ja` (DVC's name for the instance, unless DVC says otherwise)."""
    return f"{name}@{'-'.join(instance.values())}" if instance else name


def require(condition: bool, message: str) -> None:
    if not condition:
        raise StageError(message)


def require_dataset(params: Params, dataset: str) -> None:
    require(
        dataset in params.datasets, f"dataset {dataset!r} is not in params (datasets: {', '.join(params.datasets)})"
    )


def require_language(params: Params, lang: str) -> None:
    require(lang in params.languages, f"{lang!r} is not one of languages ({', '.join(params.languages)})")


def require_evaluated(params: Params, regime: str, lang: str) -> None:
    require(
        (regime, lang) in params.evaluated_pairs(),
        f"{regime}-{lang} is not evaluated with these params (evaluation.regimes, languages)",
    )


@contextmanager
def tracked_stage(name: str, params: Params, **instance: str) -> Iterator[StageRun]:
    """The stage's MLflow run, with the params keys it reads and its budget figures."""
    from budget_alignment import tracking

    with tracking.stage_run(instance_name(name, **instance), params, stage_keys(name, params, **instance)) as run:
        yield run


def load(params_file: Path) -> Params:
    from budget_alignment.params import load_params

    return load_params(params_file)


# --- the stages ----------------------------------------------------------------------------------------------------


@app.command("base-model")
def base_model(params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage base_model: the base model as a safetensors folder under data/models/base/."""
    params = load(params_file)
    with tracked_stage("base_model", params) as run:
        from budget_alignment import paths
        from budget_alignment.train.base_model import materialize_base_model

        materialize_base_model(params, paths.base_model_dir(), run)


def each_dataset(params: Params, datasets: list[str] | None, work: Callable[[str], object]) -> None:
    """A data stage over its datasets (all of params, or those asked): each is judged and delivered on its own, so a
    dataset that fails its contract stops neither the others nor their outputs; the stage fails at the end with every
    failure (DVC records no output of a failed stage, and a machine translation's chunks are cached for the rerun)."""
    for dataset in datasets or []:
        require_dataset(params, dataset)
    failures: list[StageError] = []
    for dataset in datasets or list(params.datasets):
        try:
            work(dataset)
        except StageError as error:
            logging.getLogger(__name__).error("dataset %s failed: %s", dataset, error)
            failures.append(error)
    if len(failures) == 1:
        raise failures[0]
    require(not failures, f"{len(failures)} datasets failed:\n" + "\n".join(str(error) for error in failures))


@app.command("ingest")
def ingest(datasets: Datasets = None, params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage ingest: each dataset's English records from its source into data/ingested/DATASET.jsonl."""
    params = load(params_file)
    with tracked_stage("ingest", params) as run:
        from budget_alignment.data.ingest import ingest_dataset
        from budget_alignment.data.validation import one_docs_build

        with one_docs_build(run):
            each_dataset(params, datasets, lambda dataset: ingest_dataset(params, dataset, run))


@app.command("translate")
def translate(datasets: Datasets = None, langs: LangOption = None, params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage translate: each dataset's human or machine translation into each of its languages, into
    data/translated/DATASET/LANG.jsonl."""
    from budget_alignment.data.translation_backends import check_api_keys

    params = load(params_file)
    for dataset in datasets or list(params.datasets):
        require_dataset(params, dataset)
        for lang in langs or []:
            entries = params.datasets[dataset].translation
            require(lang in entries, f"datasets.{dataset}.translation has no entry for {lang!r}")
        check_api_keys(params, dataset, langs)  # before any work: a missing key costs nothing
    with tracked_stage("translate", params) as run:
        from budget_alignment.data.translate import Translators, translate_dataset
        from budget_alignment.data.validation import one_docs_build

        # A local translation model loads once for every dataset; the Data Docs are built once for all of them.
        with Translators(params) as translators, one_docs_build(run):
            each_dataset(
                params,
                datasets,
                lambda dataset: translate_dataset(params, dataset, run, langs=langs, backends=translators),
            )


@app.command("normalize")
def normalize(datasets: Datasets = None, langs: LangOption = None, params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage normalize: cleaning and the per-language normalization rules, into data/normalized/DATASET/LANG.jsonl."""
    params = load(params_file)
    for lang in langs or []:
        require(lang in params.normalize, f"normalize has no entry for {lang!r} ({', '.join(params.normalize)})")
    with tracked_stage("normalize", params) as run:
        from budget_alignment.data.normalize import normalize_dataset
        from budget_alignment.data.validation import one_docs_build

        with one_docs_build(run):
            each_dataset(params, datasets, lambda dataset: normalize_dataset(params, dataset, run, langs=langs))


def run_training(
    name: str,
    params: Params,
    argv: list[str],
    params_file: Path,
    *,
    train,
    batch_key: str,
    model: str,
    full: bool,
    **ids,
) -> None:
    """A training stage: one process, or re-launched on several under `accelerate launch` (train/launch.py).

    `train(run)` trains and returns its metrics; `batch_key` names the global batch's param; `model` is the model
    written; `full`: a full fine-tune (a sharded launch config on GPUs); `ids` the stage instance (`lang`, `init`).
    """
    from budget_alignment import paths
    from budget_alignment.train.launch import run_stage

    stage = instance_name(name, **ids)
    run_stage(
        stage,
        params,
        stage_keys(name, params, **ids),
        [*argv, "--params", str(params_file)],
        [paths.model_dir(model), paths.training_metrics_file(stage)],
        train,
        batch_key=batch_key,
        full_finetune=full,
    )


@app.command("sft")
def sft(lang: Lang, params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage sft@LANG: fine-tune the base on the reasoning chains of LANG; writes data/models/sft/LANG/."""
    from budget_alignment.train import sft as training

    params = load(params_file)
    require_language(params, lang)
    train = lambda run: training.train_sft(params, lang, run)  # noqa: E731
    full = not params.sft.use_lora
    run_training(
        "sft",
        params,
        ["sft", lang],
        params_file,
        train=train,
        batch_key=training.BATCH_KEY,
        model=f"sft-{lang}",
        full=full,
        lang=lang,
    )


@app.command("topup")
def topup(lang: Lang, params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage topup@LANG: SFT of LANG continued on the top-up set when LANG is in topup.languages (GRPO-from-SFT then
    starts from it), else a marker that changes nothing below it; writes data/models/topup/LANG/."""
    from budget_alignment.train import topup as training

    params = load(params_file)
    require_language(params, lang)
    if not training.topped_up(params, lang):
        with tracked_stage("topup", params, lang=lang) as run:
            from budget_alignment import paths

            training.switch_off(lang)
            run.add_output(paths.model_dir(f"topup-{lang}"))
        return
    train = lambda run: training.train_topup(params, lang, run)  # noqa: E731
    run_training(
        "topup",
        params,
        ["topup", lang],
        params_file,
        train=train,
        batch_key=training.BATCH_KEY,
        model=f"topup-{lang}",
        full=training.full_finetune(params, lang),
        lang=lang,
    )


@app.command("grpo-data")
def grpo_data(langs: Langs = None, params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage grpo_data: GRPO's prompts in each language of `languages`, the mixture of grpo.datasets with each one's
    domain, into data/grpo/LANG.jsonl."""
    params = load(params_file)
    for lang in langs or []:
        require_language(params, lang)
    with tracked_stage("grpo_data", params) as run:
        from budget_alignment.train.grpo_data import gather_grpo_problems

        for lang in langs or params.languages:
            gather_grpo_problems(params, lang, run)


@app.command("grpo")
def grpo(
    init: Annotated[str, typer.Argument(help="Where the policy starts: base or sft.")],
    lang: Lang,
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage grpo@INIT-LANG: GRPO on the prompts of LANG (data/grpo/LANG.jsonl) from the base or LANG's SFT model."""
    from budget_alignment.train import grpo as training

    params = load(params_file)
    require(init in ("base", "sft"), f"INIT must be base or sft, got {init!r}")
    require_language(params, lang)
    train = lambda run: training.train_grpo(params, init, lang, run)  # noqa: E731
    model = training.model_name(init, lang)
    run_training(
        "grpo",
        params,
        ["grpo", init, lang],
        params_file,
        train=train,
        batch_key=training.BATCH_KEY,
        model=model,
        full=False,
        init=init,
        lang=lang,
    )


@app.command("merge")
def merge(params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage merge: mergekit over params.merge.members (Base + the SFT models, linear) into data/models/merge/."""
    params = load(params_file)
    with tracked_stage("merge", params) as run:
        from budget_alignment import paths
        from budget_alignment.merge import merge_models

        merge_models(params, paths.model_dir("merge"), run)


@app.command("merge-members")
def merge_members(
    init: Annotated[str, typer.Argument(help="The init of the GRPO members: base or sft.")],
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage merge_members@INIT: digests of the GRPO-from-INIT members of the merge, which the merge depends on."""
    params = load(params_file)
    require(
        init in params.merge.grpo_inits,
        f"{init!r} is not in merge.grpo_inits ({', '.join(params.merge.grpo_inits) or 'empty'})",
    )
    with tracked_stage("merge_members", params, init=init) as run:
        from budget_alignment.merge import record_merge_members

        record_merge_members(params, init, run)


@app.command("problems")
def problems(langs: Langs = None, params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage problems: the evaluation sets (their first evaluation.limit problems) of each language under `normalize`,
    English included, in data/problems/LANG/."""
    params = load(params_file)
    for lang in langs or []:
        require(lang in params.normalize, f"{lang!r} has no entry under `normalize` ({', '.join(params.normalize)})")
    with tracked_stage("problems", params) as run:
        from budget_alignment.evaluation.problems import gather_problems

        for lang in langs or list(params.normalize):
            gather_problems(params, lang, run)


@app.command("generate")
def generate(
    regime: Regime,
    langs: Annotated[
        list[str] | None, typer.Argument(help="Only these languages (default: every one REGIME is evaluated in).")
    ] = None,
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage generate@REGIME: n sampled completions per evaluation problem in each language, into
    data/generations/REGIME/LANG/; a language whose model, problems and settings did not change reuses its last run."""
    params = load(params_file)
    require(regime in params.evaluation.regimes, f"{regime!r} is not one of evaluation.regimes")
    for lang in langs or []:
        require_evaluated(params, regime, lang)
    with tracked_stage("generate", params, regime=regime) as run:
        from budget_alignment.evaluation.generate import generate_regime

        generate_regime(params, regime, langs, run)


@app.command("score")
def score(
    regime: Annotated[str | None, typer.Argument(help="Only this regime (with LANG).", show_default=False)] = None,
    lang: Annotated[str | None, typer.Argument(help="Only this language (with REGIME).", show_default=False)] = None,
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Stage score: judge every cached generation of every evaluated regime and language (or of REGIME LANG);
    scores into data/scores/REGIME-LANG/, metrics into reports/scores/REGIME-LANG.json."""
    params = load(params_file)
    require((regime is None) == (lang is None), "give both REGIME and LANG, or neither (every evaluated pair)")
    if regime is not None and lang is not None:
        require_evaluated(params, regime, lang)
    with tracked_stage("score", params) as run:
        from budget_alignment.evaluation.score import score_generations

        for pair in [(regime, lang)] if regime and lang else params.evaluated_pairs():
            score_generations(params, *pair, run)


@app.command("report")
def report(params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Stage report: reports/metrics.json, reports/report.md, the Pareto analysis and the figures."""
    params = load(params_file)
    with tracked_stage("report", params) as run:
        from budget_alignment.report import build_report

        build_report(params, run)


# --- tools ---------------------------------------------------------------------------------------------------------


@app.command("check-params")
def check_params(
    params_file: Annotated[Path, typer.Argument(help="The file to check.")] = DEFAULT_PARAMS,
) -> None:
    """Validate a params file and print every error with its key path (`grpo.clip_high: ...`)."""
    params = load(params_file)
    typer.echo(f"{params_file}: valid ({params.profile} profile, languages {', '.join(params.languages)})")


Overrides = Annotated[list[str] | None, typer.Argument(help="Hydra overrides, e.g. profile=paper grpo.clip_high=0.24")]
ConfigDir = Annotated[Path, typer.Option(help="Hydra config folder.")]


def compose(output: Path, config_dir: Path, overrides: list[str] | None) -> Params:
    """conf/ composed into `output` exactly as `dvc exp run -S ...` composes params.yaml, validated."""
    from dvc.utils.hydra import compose_and_dump

    from budget_alignment.params import ParamsError, load_params
    from budget_alignment.stages import register_resolver

    require((config_dir / "config.yaml").is_file(), f"{config_dir}/config.yaml not found")
    register_resolver()  # DVC registers it through hydra_plugins/
    compose_and_dump(output, str(config_dir.resolve()), None, "config", str(config_dir.resolve()), overrides or [])
    try:
        return load_params(output)
    except ParamsError as error:
        raise StageError(f"the composed parameters are invalid:\n{error}") from None


@app.command("compose-params")
def compose_params(
    overrides: Overrides = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the composed file.")] = DEFAULT_PARAMS,
    config_dir: ConfigDir = Path("conf"),
) -> None:
    """Compose conf/ into params.yaml exactly as `dvc exp run -S ...` does (for a plain `dvc repro`)."""
    params = compose(output, config_dir, overrides)
    typer.echo(f"wrote {output} ({params.profile} profile)")


@app.command("score-files")
def score_files(
    problems: Annotated[Path, typer.Argument(help="Problem records (jsonl) the completions answer.")],
    completions: Annotated[Path, typer.Argument(help="Completion records (jsonl) of one model and language.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the Score records (jsonl).")],
    metrics: Annotated[
        Path | None, typer.Option(help="Where to write the metrics JSON (default: OUT with suffix .metrics.json).")
    ] = None,
    params_file: ParamsFile = DEFAULT_PARAMS,
) -> None:
    """Score any pair of record files outside the pipeline: Score records and their metrics beside OUT.

    It writes nothing into the pipeline's folders and opens no MLflow run, so it never changes an experiment.
    """
    from budget_alignment.evaluation.score import score_paths

    params = load(params_file)
    score_paths(problems, completions, out, params.scoring, params.evaluation.k, metrics)


@app.command("budget")
def budget() -> None:
    """What the last runs cost, per stage and per regime, beside what `budget-align plan` predicted, into
    reports/budget.md (from reports/budget/*.json and params.yaml)."""
    from budget_alignment.budget import write_budget_report
    from budget_alignment.params import load_params

    typer.echo(f"wrote {write_budget_report(load_params())}")


@app.command("compare")
def compare(
    all_commits: Annotated[
        bool, typer.Option("--all-commits", "-A", help="Every commit's experiments, not only the current commit's.")
    ] = False,
    from_json: Annotated[
        Path | None, typer.Option("--from-json", help="A saved `dvc exp show --json` instead of running it.")
    ] = None,
    metric: Annotated[
        str | None, typer.Option(help="The accuracy metric (default: the baseline's report.accuracy_metric).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="The table (default reports/compare.md; the figure beside it).")
    ] = None,
) -> None:
    """The experiments of `dvc exp show --json` side by side: one table and one Pareto figure of experiment x regime x
    language (reports/compare.md, reports/compare.png), after a sweep such as `dvc exp run --queue ...`."""
    import json

    from budget_alignment.compare import compare_experiments, dvc_exp_show

    try:
        show = (
            json.loads(from_json.read_text(encoding="utf-8")) if from_json else dvc_exp_show(all_commits=all_commits)
        )
    except (OSError, json.JSONDecodeError) as error:
        raise StageError(f"{from_json}: cannot read a `dvc exp show --json` output: {error}") from None
    table, figure, rows = compare_experiments(show, out, metric)
    experiments = len({row.experiment for row in rows})
    typer.echo(f"wrote {table} and {figure} ({experiments} experiments, {len(rows)} experiment x regime x language)")


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option(help="The port of the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="The address it listens on.")] = "127.0.0.1",
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open a browser where there is one.")] = True,
) -> None:
    """The MLflow UI over the repository's runs (mlflow.db), opening on the runs table of the project's experiment."""
    from budget_alignment.ui import serve, ui_command

    command, url = ui_command(load(DEFAULT_PARAMS), host, port)
    if command is None:
        typer.echo(f"MLflow runs: {url}  (the tracking server MLFLOW_TRACKING_URI names)")
        return
    typer.echo(f"MLflow UI: {url}  (the runs table of every stage; Ctrl-C stops it)")
    raise typer.Exit(serve(command, url, open_browser=open_browser))


@app.command("plan")
def plan(
    overrides: Overrides = None,
    params_file: ParamsFile = DEFAULT_PARAMS,
    config_dir: ConfigDir = Path("conf"),
) -> None:
    """The run's work, disk and time before it starts, for params.yaml or conf/ composed with OVERRIDES.

    Fails (status 1) when the repository's file system cannot hold what the run will write.
    """
    import tempfile

    from budget_alignment import paths
    from budget_alignment.plan import check_disk, make_plan, plan_table

    if overrides:
        with tempfile.TemporaryDirectory() as folder:
            params = compose(Path(folder) / "params.yaml", config_dir, overrides)
    else:
        params = load(params_file)
    result = make_plan(params)
    typer.echo(plan_table(result))
    check_disk(result, paths.repo_root())


@app.command("sync-tracking")
def sync_tracking() -> None:
    """Send MLflow what stages could not log while the tracking store was down or failing (their runs, params, metrics,
    artifacts and final states, kept in .cache/tracking/outbox/). Fails (status 1) unless the outbox is then empty."""
    from budget_alignment import paths, tracking_store

    report = tracking_store.send_outbox()
    for line in report.sent:
        typer.echo(f"sent {line}")
    for line in report.dropped:
        typer.echo(f"dropped {line}", err=True)
    require(
        not report.left,
        f"{len(report.left)} run(s) still wait in {paths.tracking_outbox()}: " + "; ".join(report.left),
    )
    typer.echo(f"the outbox is empty ({len(report.sent)} run(s) sent)")


def main() -> None:
    """The console script (`budget-align`)."""
    app()


if __name__ == "__main__":
    main()
