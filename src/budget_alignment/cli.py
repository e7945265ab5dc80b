"""`budget-align`: one command per pipeline stage, each reading its parameters from params.yaml.

Heavy libraries (torch, transformers, mlflow, great-expectations) are imported inside the commands so that
`budget-align --help` starts fast.
"""

from __future__ import annotations

import logging
import os
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
    overrides: Annotated[list[str] | None, typer.Argument(help="Hydra overrides, e.g. profile=paper grpo.clip_high=0.24")] = None,
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
    from budget_alignment.train.models import ModelSourceError, materialize_base_model

    params = load(params_file)
    with tracking.stage_run("base_model", params, ["base_model", "compute"]) as run:
        try:
            materialize_base_model(params, paths.base_model_dir(), run)
        except ModelSourceError as error:
            fail(str(error))


if __name__ == "__main__":
    app()
