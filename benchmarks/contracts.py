"""Benchmark: the data contracts on 10,000 records run in under 10 s.

Times the translate stage's suite (the largest: alignment with English, protected spans, language, length ratio)
and the normalize stage's suite on 10,000 Japanese records built from the bundled chains (ids made unique), each
beside its English original. Great-expectations is imported and warmed up before the clock starts.

    .venv/bin/python benchmarks/contracts.py [--records 10000] [--limit-s 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--limit-s", type=float, default=10.0)
    args = parser.parse_args()

    from budget_alignment.data import contracts
    from budget_alignment.data.sources import load_source
    from budget_alignment.params import BundledSource, TranslationParams

    os.chdir(tempfile.mkdtemp(prefix="bench-contracts-"))
    os.environ.pop("DVC_ROOT", None)
    english_base = load_source(BundledSource(name="chains"), "chains", "en")
    japanese_base = load_source(BundledSource(name="chains"), "chains", "ja")
    english, japanese = [], []
    for i in range(args.records):
        k = i % len(english_base)
        ident = f"chains-{i:05d}"
        english.append(english_base[k].model_copy(update={"id": ident}))
        source = {"method": "human", "source_answer": japanese_base[k].answer}
        provenance = {**japanese_base[k].provenance, "translation": source}
        japanese.append(japanese_base[k].model_copy(update={"id": ident, "provenance": provenance}))
    entry = TranslationParams(human=BundledSource(name="chains"))

    # Warm-up on a few records: imports, lingua's detector, the Data Docs site's static files.
    contracts.check_translated(japanese[:50], english[:50], lang="ja", entry=entry, stage="translate@warmup")

    started = time.perf_counter()
    translated = contracts.check_translated(japanese, english, lang="ja", entry=entry, stage="translate@chains")
    translate_s = time.perf_counter() - started
    started = time.perf_counter()
    normalized = contracts.check_normalized(
        japanese,
        english,
        lang="ja",
        rules=["halfwidth_digits"],
        stage="normalize@chains",
        expected_ids=[p.id for p in japanese],
    )
    normalize_s = time.perf_counter() - started
    assert translated.passed and normalized.passed, "the bundled chains must pass their contracts"

    ok = translate_s < args.limit_s and normalize_s < args.limit_s
    print(f"records: {args.records} (Japanese, each beside its English original)")
    print(f"translate suite: {translate_s:6.2f} s")
    print(f"normalize suite: {normalize_s:6.2f} s")
    print(f"limit {args.limit_s:.1f} s each: {'PASS' if ok else 'FAIL'}  (report folder: {Path.cwd()})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
