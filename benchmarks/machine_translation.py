"""Benchmark: machine translation of bundled chains and math problems with a local transformers model, per language.

Runs the real stages (`ingest_dataset`, `translate_dataset`) in a scratch folder with a cold translation cache and
the paper profile's prompt, with the given chunking, length and retry settings, and the translate contract's
maximum rejected fraction at 1 (so every language finishes and its quarantine can be counted). For each language it
prints the records that pass the contract, the checks the others failed, the chunks asked (retries included) and
the wall time; the model loads once, before the clock starts.

    .venv/bin/python benchmarks/machine_translation.py --model data/models/base --limit 6 --max-new-tokens 160
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Metrics:
    """Stands in for a stage's MLflow run: keeps the metrics the stage logs."""

    active = False

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def add_output(self, path) -> None:
        pass

    def log_metrics(self, metrics) -> None:
        self.metrics.update(metrics)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="data/models/base", help="a local chat model folder")
    parser.add_argument("--datasets", nargs="+", default=["chains", "math"])
    parser.add_argument("--langs", nargs="+", default=["ja", "fr", "es"])
    parser.add_argument("--limit", type=int, default=6, help="records per dataset")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--max-chars-per-chunk", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--validation-retries", type=int, default=1)
    parser.add_argument("--retry-temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from budget_alignment import paths
    from budget_alignment.data.ingest import ingest_dataset
    from budget_alignment.data.translate import translate_dataset
    from budget_alignment.data.translation_backends import TransformersBackend
    from budget_alignment.params import MachineTranslationParams, Params, load_params

    torch.set_num_threads(args.threads)
    model = str(Path(args.model).resolve())
    settings = MachineTranslationParams(
        backend="transformers",
        model=model,
        api_key_env=None,
        temperature=0.0,
        retry_temperature=args.retry_temperature,
        prompt_version="v1",
        max_chars_per_chunk=args.max_chars_per_chunk,
        validation_retries=args.validation_retries,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        dtype="float32",
    )
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["tracking"]["enabled"] = False
    raw["translate"] = settings.model_dump(mode="json")
    raw["contracts"]["max_rejected_fraction"]["translate"] = 1.0
    for name in args.datasets:
        raw["datasets"][name]["limit"] = args.limit
        for lang in args.langs:
            raw["datasets"][name]["translation"][lang] = {"machine": raw["translate"]}
    params = Params.model_validate(raw)

    work = Path(tempfile.mkdtemp(prefix="bench-mt-"))
    os.chdir(work)
    os.environ.pop("DVC_ROOT", None)
    os.environ["BUDGET_ALIGNMENT_CACHE"] = str(work / "cache")
    started = time.perf_counter()
    translator = TransformersBackend(settings)
    translator._load()
    load_s = time.perf_counter() - started
    print(f"model {args.model}: loaded in {load_s:.1f} s; settings {json.dumps(vars(args))}")
    print(
        f"{'dataset':8} {'lang':4} {'passed':>7} {'chunks':>7} {'asked':>6} {'retried':>8} {'seconds':>8}  rejected by"
    )
    total = Counter()
    for name in args.datasets:
        ingest_dataset(params, name)
        for lang in args.langs:
            run = Metrics()
            started = time.perf_counter()
            accepted = translate_dataset(params, name, run, langs=[lang], translator=translator)[lang]
            seconds = time.perf_counter() - started
            figures = {key.removeprefix(f"{lang}."): value for key, value in run.metrics.items()}
            checks = Counter()
            for line in paths.rejected_records(f"translate@{name}", lang).read_text().splitlines():
                checks.update(json.loads(line)["checks"])
            print(
                f"{name:8} {lang:4} {len(accepted):>3}/{int(figures['records']):<3} "
                f"{int(figures['unique_chunks']):>7} {int(figures['translated']):>6} "
                f"{int(figures['retried_chunks']):>8} {seconds:8.1f}  "
                + (", ".join(f"{check} {count}" for check, count in checks.most_common()) or "-"),
                flush=True,
            )
            total[lang] += len(accepted)
            total[f"{lang} seconds"] += seconds
    for lang in args.langs:
        print(
            f"{lang}: {total[lang]} records pass over {len(args.datasets)} datasets, {total[f'{lang} seconds']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
