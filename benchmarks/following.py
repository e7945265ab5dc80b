"""How often a model reasons (and answers) in the language it is asked in: the tiny base before and after the
English reasoning prior, and SFT models.

    .venv/bin/python benchmarks/following.py --model raw=DIR --model prior=data/models/base \\
        --model sft-ja=data/models/sft/ja --langs ja fr es

Each model (a model folder or an adapter folder) answers held-out problems (the GRPO set, which neither the prior
nor SFT trains on) asked in each language with the pipeline's prompts, sampled as the tiny evaluation samples
(temperature, top-p and max new tokens from `evaluation`). Every completion is judged by the scoring code's
language check: `think` is the share whose reasoning is in the asked language, `following` the share whose
reasoning and answer both are (the report's metric). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from budget_alignment import loading, prompts
from budget_alignment.data.sources import load_source
from budget_alignment.params import load_params
from budget_alignment.scoring.language import LanguageJudge

ROOT = Path(__file__).resolve().parents[1]


def generate(model, tokenizer, texts: list[str], settings, samples: int) -> list[str]:
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=FOLDER (repeatable)")
    parser.add_argument("--langs", nargs="+", default=["ja", "fr", "es"])
    parser.add_argument("--limit", type=int, default=12, help="problems per language")
    parser.add_argument("--samples", type=int, default=2, help="completions per problem")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params = load_params(args.params)
    # GRPO's first dataset (the math problems).
    dataset = next(name for name, share in params.grpo.datasets.items() if share.weight > 0)
    spec = params.datasets[dataset]
    judge = LanguageJudge(params.scoring.language)
    rows = []
    for named in args.model:
        name, _, folder = named.partition("=")
        model = loading.load_model(Path(folder), params).eval()
        tokenizer = loading.load_model_tokenizer(Path(folder), params)
        for lang in args.langs:
            source = spec.source if lang == "en" else spec.translation[lang].human
            problems = load_source(source, dataset, lang)[: args.limit]
            texts = [prompts.generation_prompt(tokenizer, p, params.prompts) for p in problems]
            torch.manual_seed(args.seed)
            completions = generate(model, tokenizer, texts, params.evaluation, args.samples)
            verdicts = [judge.judge(text, lang) for text in completions]
            think = sum(v.think_in_lang for v in verdicts) / len(verdicts)
            following = sum(v.following for v in verdicts) / len(verdicts)
            rows.append((name, lang, len(verdicts), think, following, completions[0]))
            print(f"{name} {lang}: think {think:.0%}, following {following:.0%}", file=sys.stderr, flush=True)

    print(f"Language following ({args.limit} {dataset} problems x {args.samples} samples per language)\n")
    print("| model | lang | completions | reasoning in language | following (reasoning and answer) |")
    print("|---|---|---:|---:|---:|")
    for name, lang, count, think, following, _ in rows:
        print(f"| {name} | {lang} | {count} | {think:.0%} | {following:.0%} |")
    print("\nA first completion of each:\n")
    for name, lang, _, _, _, example in rows:
        print(f"- {name} {lang}: {example[:160]!r}")


if __name__ == "__main__":
    main()
