"""Speed of the transformers generation backend on the tiny profile's base model (the CPU case of `generate@...`).

    .venv/bin/python benchmarks/generation.py            # ja, the params' evaluation settings
    .venv/bin/python benchmarks/generation.py --lang fr

Needs what `generate@base` reads in a language: data/models/base and data/normalized/{set}/{lang}.jsonl (run the tiny
pipeline, or `dvc repro normalize problems`, first). Times one pooled batch (evaluation.limit problems of
every evaluation set x n samples x max_new_tokens) three times:

1. the backend as the stage runs it (grouped-KV attention, a decoding step's attention as matmuls, shared prompt
   cache, static cache, nucleus sampling), in float32 and in bf16 (`compute.mixed_precision`: bf16 where the CPU
   computes it, benchmarks/RESULTS.md);
2. the float32 loop with transformers' own "sdpa" attention, which copies each KV head to its query heads under a
   padding mask, and checks that it draws the very same tokens;
3. transformers' `generate` (`num_return_sequences=n`, the same temperature and top_p) as the reference point.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from budget_alignment import paths, prompts
from budget_alignment.evaluation.generate import TransformersBackend
from budget_alignment.params import load_params
from budget_alignment.records import Problem, read_records


def timed(call):
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lang", default="ja")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    settings = params.evaluation

    def backend_in(precision: str) -> TransformersBackend:
        compute = params.compute.model_copy(update={"mixed_precision": precision})
        return TransformersBackend(params.model_copy(update={"compute": compute}), paths.model_dir("base"))

    backend, load_seconds = timed(lambda: backend_in("no"))
    tokenizer = backend.tokenizer()
    problems = [
        problem
        for dataset in settings.datasets
        for problem in read_records(paths.normalized(dataset, args.lang), Problem)[: settings.limit]
    ]
    texts = [prompts.generation_prompt(tokenizer, p, params.prompts, args.lang) for p in problems]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    rows = []
    grouped, seconds = timed(lambda: backend.generate(texts, settings.n, seed=1))
    tokens = sum(sample.tokens for samples in grouped for sample in samples)
    rows.append(("backend (grouped-KV attention), float32", seconds, tokens))
    in_bf16 = backend_in("bf16")
    sampled, seconds = timed(lambda: in_bf16.generate(texts, settings.n, seed=1))
    rows.append(("backend (grouped-KV attention), bf16", seconds, sum(s.tokens for row in sampled for s in row)))

    backend.model.set_attn_implementation("sdpa")
    plain, seconds = timed(lambda: backend.generate(texts, settings.n, seed=1))
    plain_tokens = sum(s.tokens for samples in plain for s in samples)
    rows.append(("backend with transformers' sdpa, float32", seconds, plain_tokens))
    same = [[s.text for s in samples] for samples in plain] == [[s.text for s in samples] for samples in grouped]

    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(1)
    with torch.inference_mode():
        output, seconds = timed(
            lambda: backend.model.generate(
                **encoded,
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_new_tokens=settings.max_new_tokens,
                num_return_sequences=settings.n,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    new = output[:, encoded["input_ids"].shape[1] :]
    new_tokens = int((new != tokenizer.pad_token_id).sum())
    rows.append(("transformers generate (sdpa, num_return_sequences), float32", seconds, new_tokens))

    print(
        f"{len(texts)} prompts ({min(lengths)}-{max(lengths)} tokens) x n={settings.n}, "
        f"max_new_tokens={settings.max_new_tokens}, {torch.get_num_threads()} threads; "
        f"model load {load_seconds:.1f} s\n"
    )
    print("| generation | seconds | tokens | tokens/s |\n|---|---|---|---|")
    for name, seconds, tokens in rows:
        print(f"| {name} | {seconds:.1f} | {tokens} | {tokens / seconds:.0f} |")
    print(f"\nsame tokens with either attention (float32): {same}")


if __name__ == "__main__":
    main()
