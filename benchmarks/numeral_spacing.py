"""Tokens the `compact_numeral_spacing` normalization saves on the bundled sets, per dataset and language.

    .venv/bin/python benchmarks/numeral_spacing.py --tokenizer data/models/base     # SmolLM2's (after base_model)
    .venv/bin/python benchmarks/numeral_spacing.py --tokenizer DIR --sets chains college_math

Every question, choice and solution of a bundled set is cleaned as the normalize stage cleans it, then tokenized as
it is and with the rule applied (the rule alone: the other rules of a language change few tokens). Prints a markdown
table: records the rule changes, tokens before and after, and the share saved.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from budget_alignment.data.normalize import normalize_field

ROOT = Path(__file__).resolve().parents[1]
RULE = ["compact_numeral_spacing"]


def texts(name: str, lang: str) -> list[list[str]]:
    """Each record's texts: question, choices, solution."""
    path = resources.files("budget_alignment.data").joinpath("bundled", name, f"{lang}.jsonl")
    records = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    return [[r["question"], *(r.get("choices") or {}).values(), r.get("solution") or ""] for r in records]


def token_counts(tokenizer, records: list[list[str]], lang: str) -> tuple[int, int, int]:
    """(records changed, tokens as written, tokens with the rule)."""
    changed = before = after = 0
    for record in records:
        cleaned = [normalize_field(text, lang, []) for text in record]
        compact = [normalize_field(text, lang, RULE) for text in record]
        changed += cleaned != compact
        before += sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in cleaned)
        after += sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in compact)
    return changed, before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data/models/base", help="a tokenizer folder")
    parser.add_argument(
        "--sets", nargs="+", default=["chains", "math", "college_math", "competition_math", "science", "medicine"]
    )
    parser.add_argument("--langs", nargs="+", default=["ja", "fr", "es", "en"])
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(f"Tokenizer: {args.tokenizer}\n")
    print("| set | lang | records changed | tokens | with the rule | saved |")
    print("|---|---|---|---|---|---|")
    for name in args.sets:
        for lang in args.langs:
            records = texts(name, lang)
            changed, before, after = token_counts(tokenizer, records, lang)
            saved = 100 * (before - after) / before if before else 0.0
            print(f"| {name} | {lang} | {changed}/{len(records)} | {before} | {after} | {saved:.1f}% |")


if __name__ == "__main__":
    main()
