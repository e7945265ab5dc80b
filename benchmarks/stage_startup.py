"""What every stage of the pipeline pays before its work: a fresh process importing its libraries, and DVC's turn.

    .venv/bin/python benchmarks/stage_startup.py            # the stages of ./dvc.yaml (the params' profile)
    .venv/bin/python benchmarks/stage_startup.py --runs 5

Each stage is its own process (one stage per data step over every dataset, one per model x language), so the pipeline
pays Python's start-up and its libraries' imports once per stage. This measures, in fresh interpreters (median of
--runs), the imports each kind of stage makes and the MLflow helper process beside every stage, and DVC's own cost
of a stage (a repository of trivial stages, `dvc repro` timed); it multiplies them by the number of stages of each
kind in dvc.yaml. The sum is a floor under the cold `dvc repro` that no change inside a stage removes.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each kind of stage: the stage names it covers (prefixes) and what such a stage imports (the project's modules
# for its command, and the libraries those import inside the command).
KINDS = {
    "ingest / translate / normalize": (
        ("ingest", "translate", "normalize", "problems", "grpo_data"),
        "import budget_alignment.cli, budget_alignment.data.contracts, budget_alignment.data.normalize, "
        "budget_alignment.data.translate, budget_alignment.scoring.language, lingua",
    ),
    "base_model / sft / grpo": (
        ("base_model", "sft@", "grpo@"),
        "import budget_alignment.cli, budget_alignment.train.sft, budget_alignment.train.grpo, torch, peft, datasets\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer\n"
        "from trl import SFTTrainer, GRPOTrainer",
    ),
    "merge": (
        ("merge",),
        "import budget_alignment.cli, budget_alignment.merge, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from mergekit.merge import run_merge",
    ),
    "generate": (
        ("generate@",),
        "import budget_alignment.cli, budget_alignment.evaluation.generate, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache",
    ),
    "score / report": (
        ("score", "report"),
        "import budget_alignment.cli, budget_alignment.evaluation.score, budget_alignment.report, math_verify, lingua",
    ),
}

# The helper process that holds each stage's MLflow run: mlflow and its sqlite store (a store that exists already).
MLFLOW_HELPER = (
    "import mlflow, sys\nmlflow.set_tracking_uri(sys.argv[1])\nmlflow.MlflowClient().search_experiments(max_results=1)"
)

DVC_STAGES = 20


def seconds_to_run(arguments: list[str], cwd: Path | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(arguments, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


def median_import_seconds(code: str, runs: int, *arguments: str) -> float:
    return statistics.median(seconds_to_run([sys.executable, "-c", code, *arguments]) for _ in range(runs))


def stage_names() -> list[str]:
    listed = subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "list", "--name-only"], check=True, capture_output=True, text=True
    )
    return listed.stdout.split()


def dvc_seconds_per_stage(folder: Path) -> float:
    """`dvc repro` of a chain of trivial stages (each writes a file the next reads), divided by their number."""
    dvc = [sys.executable, "-m", "dvc"]
    folder.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=folder, check=True)
    lines = ["stages:"]
    for index in range(DVC_STAGES):
        deps = f"\n    deps: [s{index - 1}.txt]" if index else ""
        lines.append(f"  s{index}:\n    cmd: echo {index} > s{index}.txt{deps}\n    outs: [s{index}.txt]")
    (folder / "dvc.yaml").write_text("\n".join(lines) + "\n")
    return seconds_to_run([*dvc, "repro", "-q"], cwd=folder) / DVC_STAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    names = stage_names()
    rows = []
    for kind, (prefixes, code) in KINDS.items():
        count = sum(name.startswith(prefixes) for name in names)
        rows.append((kind, count, median_import_seconds(code, args.runs)))
    with tempfile.TemporaryDirectory() as scratch:
        uri = f"sqlite:///{scratch}/mlflow.db"
        median_import_seconds(MLFLOW_HELPER, 1, uri)  # creates the store, as the first stage of a pipeline does
        helper = median_import_seconds(MLFLOW_HELPER, args.runs, uri)
        dvc = dvc_seconds_per_stage(Path(scratch) / "dvc")

    print(f"{len(names)} stages in dvc.yaml, {os.cpu_count()} cores; median of {args.runs} fresh processes\n")
    print("| stages | count | imports per stage (s) | all of them (s) |\n|---|---|---|---|")
    for kind, count, seconds in rows:
        print(f"| {kind} | {count} | {seconds:.1f} | {count * seconds:.0f} |")
    stages = sum(count for _, count, _ in rows)
    helper_row = "MLflow helper (beside each stage, on the other core)"
    print(f"| {helper_row} | {stages} | {helper:.1f} | ({stages * helper:.0f}) |")
    dvc_row = "DVC's turn (a trivial stage in `dvc repro`; more with real deps)"
    print(f"| {dvc_row} | {stages} | {dvc:.2f} | {stages * dvc:.0f} |")
    floor = sum(count * seconds for _, count, seconds in rows) + stages * dvc
    print(f"\nfloor under a cold `dvc repro` before any stage works: {floor:.0f} s ({floor / 60:.1f} min)")


if __name__ == "__main__":
    main()
