"""The `generate@{regime}` stage: n sampled completions per evaluation problem, in every language the regime is
evaluated in, resumable and reused.

One process samples every language (one start-up; the base and the merge load once for all of them), into one folder
per language. Each language's completions are kept under the cache with a digest of what they depend on (the model's
files, the problems, the params, the code and the libraries that sample): a rerun whose inputs for a language are
unchanged reuses them instead of sampling again, so a change to one language's data regenerates that language alone.

Work happens in batches of whole problems with a seed derived from (seed, dataset, batch index), so a batch
samples the same completions whether it runs in one go or after a crash. Finished problems are appended to a
work file under the cache as soon as their batch ends; a killed run resumes from there and regenerates only the
unfinished batches. The finished files are then written into the language's output folder at once.

A LoRA adapter is sampled on the parent model it records (`loading.adapter_parent`): the base, or the fully
fine-tuned SFT model a GRPO adapter was trained on. Prompts are the chat template's text, tokenized without added
special tokens (the template writes any BOS itself), for both backends.

The output is a pure function of the model and the params: the run's own facts (time, reused work) go to the
stage's budget and MLflow.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from budget_alignment import loading, paths, prompts
from budget_alignment.errors import StageError
from budget_alignment.evaluation.problems import read_problems
from budget_alignment.fingerprints import source_digest, tree_digest
from budget_alignment.io import atomic_directory, atomic_write, write_json, writing
from budget_alignment.params import Params
from budget_alignment.prompts import prompt_token_ids
from budget_alignment.records import Completion, Problem, read_records
from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)
T = TypeVar("T")

META_FILE = "generation.json"
# The libraries whose versions the samples depend on, per backend.
SAMPLING_LIBRARIES = {"transformers": ("torch", "transformers", "peft"), "vllm": ("torch", "vllm")}


class GenerationError(StageError, RuntimeError):
    """The model to sample from is missing or the backend cannot run."""


@dataclass(frozen=True)
class Sample:
    text: str
    tokens: int
    finish_reason: str


class Backend(Protocol):
    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Sample]]: ...

    def tokenizer(self) -> Any: ...


class TransformersBackend:
    """Batched sampling with left padding and the KV cache; a LoRA adapter is merged into its parent.

    The decoding loop is this class's own rather than transformers' `generate`, whose sampling step (a sort and a
    multinomial draw over the whole vocabulary for every sequence) was a large part of a CPU step
    (benchmarks/generation.py). It samples as vLLM does: temperature, then top-p, no top-k (`generate` would add
    top_k=50).
    """

    def __init__(self, params: Params, model_dir: Path) -> None:
        import torch

        settings = params.evaluation
        self.settings = settings
        self.device = "cuda" if loading.gpu_available(params.compute) else "cpu"
        if params.compute.torch_threads:
            torch.set_num_threads(params.compute.torch_threads)
        self._tokenizer = loading.load_model_tokenizer(model_dir, params, padding_side="left")
        model = loading.load_model(model_dir, params)
        if loading.is_adapter(model_dir):  # merged: one matmul per layer instead of three
            model = model.merge_and_unload()
        if loading.bf16_mixed_precision(params.compute):  # sampled in bf16, as vLLM samples (logits: float32)
            model = model.to(torch.bfloat16)
        self.model = model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(
            eos if isinstance(eos, list) else [eos if eos is not None else self._tokenizer.eos_token_id]
        )

    def tokenizer(self) -> Any:
        return self._tokenizer

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Sample]]:
        import torch
        from transformers import DynamicCache, StaticCache

        settings = self.settings
        encoded = self._tokenizer.pad(
            {"input_ids": [prompt_token_ids(self._tokenizer, text) for text in prompts]}, return_tensors="pt"
        )
        ids, mask = encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        generator = torch.Generator(self.device).manual_seed(seed)
        with torch.inference_mode():
            # Each prompt is read once (logits of its last token only) and its KV cache shared by its n samples.
            # The cache is then preallocated for the whole completion: a growing cache copies itself every step.
            prefix = DynamicCache(config=self.model.config)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=prefix, logits_to_keep=1
            ).logits[:, -1]
            prefix.batch_repeat_interleave(n)
            cache = StaticCache(config=self.model.config, max_cache_len=ids.shape[1] + settings.max_new_tokens)
            for index, layer in enumerate(prefix.layers):
                cache.update(layer.keys, layer.values, index)
            logits, mask = logits.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
            position = positions[:, -1:].repeat_interleave(n, dim=0)
            stop = torch.tensor(sorted(self.stop_ids), device=self.device)
            finished = torch.zeros(len(mask), dtype=torch.bool, device=self.device)
            steps: list[torch.Tensor] = []
            for step in range(settings.max_new_tokens):
                token = sample_token(logits, settings.temperature, settings.top_p, generator)
                token = token.masked_fill(finished, self._tokenizer.pad_token_id or 0)
                steps.append(token)
                finished |= torch.isin(token, stop)
                if bool(finished.all()) or step == settings.max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                position = position + 1
                logits = self.model(
                    input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=cache
                ).logits[:, -1]
        new_tokens = torch.stack(steps, dim=1).tolist()
        samples = [self._sample(row) for row in new_tokens]
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _sample(self, token_ids: list[int]) -> Sample:
        stop = next((i for i, token in enumerate(token_ids) if token in self.stop_ids), None)
        kept = token_ids if stop is None else token_ids[:stop]
        text = self._tokenizer.decode(kept, skip_special_tokens=True)
        return Sample(
            text=text, tokens=len(kept) + (stop is not None), finish_reason="length" if stop is None else "stop"
        )


@dataclass(frozen=True)
class VllmEngine:
    """What vLLM is started with for a model folder: the whole model, its options, and the adapter if any."""

    model: Path
    options: dict[str, Any]
    adapter: Path | None


def vllm_engine(params: Params, model_dir: Path) -> VllmEngine:
    """A whole model as it is; an adapter as a LoRA request on the parent model it was trained on."""
    loading.require_safetensors(model_dir)
    options: dict[str, Any] = {
        "tensor_parallel_size": params.evaluation.tensor_parallel_size,
        "seed": params.seed,
        "trust_remote_code": loading.trusts_remote_code(params),
        "dtype": params.base_model.dtype,
    }
    if not loading.is_adapter(model_dir):
        return VllmEngine(model_dir.resolve(), options, None)
    rank = json.loads((model_dir / loading.ADAPTER_CONFIG).read_text(encoding="utf-8"))["r"]
    options |= {"enable_lora": True, "max_lora_rank": max(8, rank)}
    return VllmEngine(loading.weights_folder(model_dir).resolve(), options, model_dir.resolve())


def vllm_prompts(tokenizer: Any, texts: list[str]) -> list[dict[str, list[int]]]:
    """vLLM's prompt inputs: token ids exactly as the chat template wrote them (vLLM would add a BOS to text)."""
    return [{"prompt_token_ids": prompt_token_ids(tokenizer, text)} for text in texts]


class VllmBackend:
    """vLLM offline batch generation (GPU); a LoRA adapter goes through `enable_lora` on its parent model."""

    def __init__(self, params: Params, model_dir: Path) -> None:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.settings = params.evaluation
        engine = vllm_engine(params, model_dir)
        self.llm = LLM(model=str(engine.model), **engine.options)
        self.lora = LoRARequest(model_dir.name, 1, str(engine.adapter)) if engine.adapter else None

    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Sample]]:
        from vllm import SamplingParams

        sampling = SamplingParams(
            n=n,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            max_tokens=self.settings.max_new_tokens,
            seed=seed,
        )
        outputs = self.llm.generate(
            vllm_prompts(self.tokenizer(), prompts), sampling, lora_request=self.lora, use_tqdm=False
        )
        return [
            [Sample(c.text, len(c.token_ids), "length" if c.finish_reason == "length" else "stop") for c in o.outputs]
            for o in outputs
        ]


# The nucleus of top-p sampling nearly always lies among a few hundred tokens: sorting only those (and the whole
# vocabulary only for the rows whose top tokens fall short of top_p) is exact, and costs a tenth of a full sort.
NUCLEUS_CANDIDATES = 256


def sample_token(logits: Any, temperature: float, top_p: float, generator: Any) -> Any:
    """One token per row: greedy at temperature 0, else from the smallest set of top tokens holding `top_p`."""
    import torch

    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    top, index = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    token = _sample_nucleus(top, index, top_p, generator)
    short = (top.sum(dim=-1) < top_p).nonzero().squeeze(-1)
    if len(short):  # a flat row: its nucleus reaches past the candidates
        token[short] = _sample_nucleus(*probs[short].sort(dim=-1, descending=True), top_p, generator)
    return token


def _sample_nucleus(top: Any, index: Any, top_p: float, generator: Any) -> Any:
    """Draw from probabilities sorted in descending order (`index`: their token ids), cut to the top_p nucleus."""
    import torch

    # A token stays while the mass before it is below top_p: the most likely one always stays.
    nucleus = top.masked_fill(top.cumsum(dim=-1) - top >= top_p, 0.0)
    return index.gather(-1, torch.multinomial(nucleus, 1, generator=generator)).squeeze(-1)


BACKENDS: dict[str, type] = {"transformers": TransformersBackend, "vllm": VllmBackend}


def batch_seed(seed: int, name: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def batches(items: list[T], size: int) -> Iterator[tuple[int, list[T]]]:
    for index, start in enumerate(range(0, len(items), size)):
        yield index, items[start : start + size]


def sampling_settings(params: Params, lang: str) -> dict[str, Any]:
    """The params the completions depend on (besides the model)."""
    settings = params.evaluation
    return {
        "lang": lang,
        "seed": params.seed,
        "backend": settings.backend,
        "n": settings.n,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
        "prompts": params.prompts.model_dump(),
    }


def fingerprint(params: Params, model_dir: Path, lang: str) -> dict[str, Any]:
    """What a language's completions depend on. Work kept under another fingerprint is discarded; under this one it
    is reused: an interrupted run resumes, a finished one is not sampled again.

    The model's files count by their state (`fingerprints.tree_digest`: what DVC's own state checks before it
    rehashes), which changes whenever a stage writes or DVC checks out another version; the problems by their bytes.
    """
    model_state = tree_digest(loading.weights_folder(model_dir), contents=False)
    if loading.is_adapter(model_dir):
        model_state += tree_digest(model_dir, contents=False)
    return {
        "model": str(model_dir),
        "model_state": model_state,
        "problems": tree_digest(paths.problems_dir(lang), contents=True),
        "code": source_digest(),
        "libraries": {name: _version(name) for name in SAMPLING_LIBRARIES[params.evaluation.backend]},
        "device": "cuda" if loading.gpu_available(params.compute) else "cpu",
        "dtype": params.base_model.dtype,
        "bf16_mixed_precision": loading.bf16_mixed_precision(params.compute),
        "torch_threads": params.compute.torch_threads,
        "datasets": params.evaluation.datasets,
        "tensor_parallel_size": params.evaluation.tensor_parallel_size,
        **sampling_settings(params, lang),
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def finished_problems(work_file: Path, n: int) -> dict[str, list[Completion]]:
    """Problems with all n completions in a work file; a torn last line (a kill or a full disk mid-write, which may
    cut a character in two) is dropped."""
    done: dict[str, list[Completion]] = {}
    if not work_file.exists():
        return done
    for line in work_file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            completion = Completion.model_validate_json(line)
        except ValueError:
            continue
        done.setdefault(completion.problem_id, []).append(completion)
    return {pid: samples for pid, samples in done.items() if len(samples) == n}


@dataclass(frozen=True)
class Job:
    """One backend call: a batch of prompts (one per problem) and its seed, fixed by params."""

    index: int
    texts: list[str]
    seed: int


def replica_count(params: Params) -> int:
    """Engines side by side (`compute.generation_replicas`; auto: one per `tensor_parallel_size` visible GPUs)."""
    replicas = params.compute.generation_replicas
    if replicas != "auto":
        return replicas
    if params.evaluation.backend != "vllm" or not loading.gpu_available(params.compute):
        return 1
    import torch

    return max(1, torch.cuda.device_count() // params.evaluation.tensor_parallel_size)


class Engines:
    """The in-process backend of the model folder sampled last, kept for the next language that samples the same
    model (the base and the merge serve every language); another folder's replaces it."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.folder: Path | None = None
        self.backend: Backend | None = None

    def for_model(self, model_dir: Path) -> Backend:
        if self.folder != model_dir:
            self.backend = None  # the last model's memory is freed before the next one loads
            self.backend = BACKENDS[self.params.evaluation.backend](self.params, model_dir)
            self.folder = model_dir
        return self.backend


def sample_jobs(
    params: Params, model_dir: Path, jobs: list[Job], engines: Engines | None = None
) -> Iterator[tuple[Job, list[list[Sample]]]]:
    """Each job with its samples, as jobs finish: in this process, or spread over replica processes (one engine
    each, on its own GPUs), whose results come back in any order.

    vLLM always runs in a replica process, even alone: its GPU memory is given back when the process ends, which an
    engine deleted in a long-lived process does not reliably do, and the next language may load another model.
    """
    if not jobs:
        return
    replicas = min(replica_count(params), len(jobs))
    if replicas <= 1 and params.evaluation.backend == "transformers":
        backend = (engines or Engines(params)).for_model(model_dir)
        for job in jobs:
            yield job, backend.generate(job.texts, params.evaluation.n, job.seed)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh process per engine: CUDA and torch threads of its own
    pending, results = context.Queue(), context.Queue()
    for job in jobs:
        pending.put(job)
    gpus = params.evaluation.tensor_parallel_size if params.evaluation.backend == "vllm" else 0
    workers = [
        context.Process(
            target=_replica,
            args=(rank, gpus, params.model_dump_json(), str(model_dir), pending, results),
            name=f"generate replica {rank}",
            daemon=False,  # vLLM starts processes of its own (its engine core, tensor-parallel workers)
        )
        for rank in range(replicas)
    ]
    for worker in workers:
        pending.put(None)  # one end marker per replica
        worker.start()
    by_index = {job.index: job for job in jobs}
    try:
        for _ in jobs:
            index, outcome = results.get()
            if isinstance(outcome, str):
                raise GenerationError(f"replica failed: {outcome}")
            yield by_index[index], outcome
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()


def replica_devices(rank: int, gpus: int, visible: str | None) -> str:
    """`CUDA_VISIBLE_DEVICES` of replica `rank` with `gpus` each: its share of the GPUs this process may see."""
    devices = [device for device in (visible or "").split(",") if device.strip()]
    mine = range(rank * gpus, (rank + 1) * gpus)
    return ",".join(devices[i] if devices else str(i) for i in mine)


def _replica(rank: int, gpus: int, params_json: str, model_dir: str, pending: Any, results: Any) -> None:
    """A replica process: its own GPUs (`gpus` per replica, none on the CPU), one engine, jobs until the end marker."""
    import os

    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = replica_devices(rank, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    params = Params.model_validate_json(params_json)
    try:
        backend = BACKENDS[params.evaluation.backend](params, Path(model_dir))
        while (job := pending.get()) is not None:
            results.put((job.index, backend.generate(job.texts, params.evaluation.n, job.seed)))
    except Exception as error:  # reported to the stage, which fails with it
        results.put((-1, f"{type(error).__name__}: {error}"))


# A language's facts of one run, beside its summary.
FACTS = ("tokens_generated", "reused_completions", "generation_seconds")


def generate_regime(params: Params, regime: str, langs: list[str] | None = None, run: StageRun | None = None) -> dict:
    """Stage generate@{regime}: `evaluation.n` completions per evaluation problem in every language the regime is
    evaluated in (or `langs`), into data/generations/{regime}/{lang}/.

    Returns each language's summary with this run's facts; their sums (tokens generated, completions reused from an
    earlier run) go to the stage's budget and MLflow, each language's under its name.
    """
    engines = Engines(params)
    results = {
        lang: generate_language(params, regime, lang, paths.generations_dir(regime, lang), engines)
        for lang in langs or params.evaluated_languages(regime)
    }
    if run is not None:
        totals = {key: sum(result[key] for result in results.values()) for key in ("completions", *FACTS)}
        run.add_output(paths.regime_generations_dir(regime))
        run.add_budget(**totals)
        run.log_metrics(totals | {f"{lang}.{key}": result[key] for lang, result in results.items() for key in FACTS})
    return results


def generate_language(params: Params, regime: str, lang: str, out: Path, engines: Engines | None = None) -> dict:
    """Sample `evaluation.n` completions for every evaluation problem in `lang` with the regime's model, into `out`.

    Returns the output's summary (`generation.json`) and this run's facts (tokens generated, completions reused
    from an earlier run, seconds), which go to the budget and MLflow, not into the output.
    """
    from tqdm import tqdm

    settings = params.evaluation
    model_name = paths.model_for(regime, lang)
    model_dir = paths.model_dir(model_name)
    try:
        loading.require_model(model_dir, f"model {model_name}")
    except loading.ModelFolderError as error:
        raise GenerationError(str(error)) from None
    work = paths.generation_work_dir(regime, lang)
    meta = fingerprint(params, model_dir, lang)
    meta_file = work / META_FILE
    if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
        log.info("the model, problems or settings changed since %s was sampled: sampling afresh", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(meta_file, meta)

    problem_sets = {dataset: read_problems(lang, dataset) for dataset in settings.datasets}
    total = sum(len(p) for p in problem_sets.values()) * settings.n
    # One batch may span the evaluation sets (a decoding step costs nearly the same for more sequences), and the
    # batches are fixed by params, so that a resumed run, or one on more replicas, draws the same samples.
    pooled = [(dataset, problem) for dataset, problems in problem_sets.items() for problem in problems]
    per_batch = max(1, settings.batch_size // settings.n)
    started = time.perf_counter()
    done: dict[str, dict[str, list[Completion]]] = {}
    for dataset in problem_sets:
        work_file = work / f"{dataset}.jsonl"
        done[dataset] = finished_problems(work_file, settings.n)
        _rewrite(work_file, done[dataset])  # drop torn lines and partial problems before appending
    reused = sum(len(samples) for finished in done.values() for samples in finished.values())
    tokenizer = loading.load_model_tokenizer(model_dir, params) if reused < total else None
    batch_of: dict[int, list[tuple[str, Problem]]] = {}
    jobs = []
    for index, batch in batches(pooled, per_batch):
        if all(problem.id in done[dataset] for dataset, problem in batch):
            continue
        batch_of[index] = batch
        texts = [prompts.generation_prompt(tokenizer, p, params.prompts, lang) for _, p in batch]
        jobs.append(Job(index, texts, batch_seed(params.seed, "pooled", index)))
    generated_tokens = 0
    with tqdm(total=total, initial=reused, desc=f"generate {regime}-{lang}", unit="completion") as progress:
        for job, results in sample_jobs(params, model_dir, jobs, engines):
            batch = batch_of[job.index]
            for dataset in dict.fromkeys(dataset for dataset, _ in batch):
                work_file = work / f"{dataset}.jsonl"
                # A full disk stops the stage here; the problems already appended are reused by the rerun.
                with writing(work_file), work_file.open("a", encoding="utf-8") as handle:
                    for (source, problem), samples in zip(batch, results, strict=True):
                        if source != dataset or problem.id in done[dataset]:
                            continue
                        for number, sample in enumerate(samples):
                            completion = Completion(
                                problem_id=problem.id,
                                model=model_name,
                                lang=lang,
                                sample=number,
                                text=sample.text,
                                tokens=sample.tokens,
                                finish_reason=sample.finish_reason,
                            )
                            handle.write(completion.model_dump_json() + "\n")
                            generated_tokens += sample.tokens
            progress.update(sum(settings.n for dataset, p in batch if p.id not in done[dataset]))
            elapsed = time.perf_counter() - started
            progress.set_postfix(tokens_per_s=f"{generated_tokens / max(elapsed, 1e-9):.0f}")

    summary: dict[str, Any] = {
        "regime": regime,
        "lang": lang,
        "model": model_name,
        "completions": total,
        "sampling": sampling_settings(params, lang),
    }
    with atomic_directory(out) as tmp:
        for dataset, problems in problem_sets.items():
            # In problem order whatever order batches finished in (a resumed run, several replicas).
            position = {problem.id: i for i, problem in enumerate(problems)}
            completions = sorted(
                read_records(work / f"{dataset}.jsonl", Completion), key=lambda c: (position[c.problem_id], c.sample)
            )
            summary[f"{dataset}_tokens"] = sum(completion.tokens for completion in completions)
            with atomic_write(tmp / f"{dataset}.jsonl") as handle:
                handle.writelines(completion.model_dump_json() + "\n" for completion in completions)
        write_json(tmp / META_FILE, summary)
    facts = {
        "tokens_generated": generated_tokens,
        "reused_completions": reused,
        "generation_seconds": round(time.perf_counter() - started, 3),
    }
    return summary | facts


def _rewrite(work_file: Path, done: dict[str, list[Completion]]) -> None:
    with atomic_write(work_file) as handle:
        for samples in done.values():
            for completion in samples:
                handle.write(completion.model_dump_json() + "\n")
