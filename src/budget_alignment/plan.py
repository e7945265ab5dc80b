"""`budget-align plan`: what a run will cost before it starts, for the composed params of any profile.

For each stage: its work (examples and tokens to train on, completions and the most tokens they may generate), the
disk it will write (outputs, the DVC cache with the link type in use, checkpoints), and its time and GPU-hours on
the machine `plan.throughput` describes (measured figures, with where they come from). The run fails before any
work when the repository's file system cannot hold what it will write.

Token counts are exact where the data and the base model's tokenizer are at hand (the tiny profile's bundled sets, or
any profile once its data stages have run): the training examples are built and tokenized as the trainers build
them. Otherwise they are estimated from characters or from `plan.sizes`, and the table says so. Generated tokens are
upper bounds (every completion at its maximum length).
"""

from __future__ import annotations

import configparser
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budget_alignment import loading, paths
from budget_alignment.errors import StageError
from budget_alignment.params import MERGE_METHODS, Params, TrainingParams, split_errors
from budget_alignment.records import Problem, read_records

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
# Adam keeps two float32 moments per trained parameter in a checkpoint, beside the weights.
OPTIMIZER_BYTES_PER_PARAMETER = 8
# Each training stage keeps its last two checkpoints (trainer_setup.common_arguments).
CHECKPOINTS_KEPT = 2
# A completion on disk: its text (about 4 bytes a token) and its record's fields.
BYTES_PER_GENERATED_TOKEN = 5


class PlanError(StageError):
    """The run would not fit: the disk, or params the plan cannot size."""


@dataclass
class StageCost:
    stage: str
    work: str
    train_tokens: int = 0
    # Optimizer steps over each trained token: GRPO trains each sampled batch `num_iterations` times.
    train_passes: int = 1
    generated_tokens: int = 0
    output_bytes: int = 0
    checkpoint_bytes: int = 0
    devices: int = 1
    estimated: bool = False
    seconds: float = 0.0

    @property
    def device_hours(self) -> float:
        return self.seconds * self.devices / 3600


@dataclass
class Plan:
    stages: list[StageCost]
    link_type: str
    cache_bytes: int
    free_bytes: int
    device: str
    throughput_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def disk_bytes(self) -> int:
        """Outputs, cache copies, and the largest stage's checkpoints (a stage removes its own once it is done)."""
        checkpoints = max((s.checkpoint_bytes for s in self.stages), default=0)
        return sum(s.output_bytes for s in self.stages) + self.cache_bytes + checkpoints

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


# --- sizes of models -----------------------------------------------------------------------------------------------


def lora_parameters(params: Params, r: int) -> int:
    """LoRA's parameters on every linear layer of a Llama/Qwen-shaped model: r x (in + out) per projection."""
    shape = params.plan.model
    kv = shape.hidden_size * shape.num_key_value_heads // shape.num_attention_heads
    h, m = shape.hidden_size, shape.intermediate_size
    per_layer = (h + h) + (h + kv) * 2 + (h + h) + (h + m) * 2 + (m + h)
    return r * per_layer * shape.num_layers


def model_bytes(params: Params, dtype: str) -> int:
    return params.plan.model.parameters * DTYPE_BYTES[dtype]


# --- counting examples and tokens ----------------------------------------------------------------------------------


@dataclass
class Texts:
    """A training or evaluation set as the plan sees it: records, and tokens per record (exact or estimated)."""

    records: int
    tokens: list[int]
    estimated: bool


def _tokenizer(params: Params) -> Any | None:
    base = paths.base_model_dir()
    if not (base / "tokenizer_config.json").is_file():
        return None
    return loading.load_model_tokenizer(base, params)


def _problems(params: Params, dataset: str, lang: str) -> list[Problem] | None:
    """The records a stage will read: the normalized file if the data stages have run, else a bundled or local source
    (English), else None."""
    normalized = paths.normalized(dataset, lang)
    if normalized.is_file():
        return read_records(normalized, Problem)
    spec = params.datasets[dataset]
    if spec.source.kind == "hub":
        return None
    from budget_alignment.data.sources import load_source

    records = load_source(spec.source, dataset, "en")
    return records[: spec.limit] if spec.limit else records


def example_tokens(examples: list[dict], tokenizer: Any, max_length: int) -> list[int]:
    """Tokens of each training example (prompt and completion) as the trainer reads it, cut at max_length."""
    ids = tokenizer([e["prompt"] + e["completion"] for e in examples])["input_ids"]
    return [min(len(i), max_length) for i in ids]


def training_texts(params: Params, dataset: str, lang: str, tokenizer: Any | None, max_length: int) -> Texts:
    """Tokens of each training example (prompt and completion, cut at max_length) as the SFT stage builds them."""
    problems = _problems(params, dataset, lang)
    if problems is None:
        return _sized(params, dataset)
    if tokenizer is not None and all(p.solution for p in problems):
        from budget_alignment.train.sft import sft_examples

        examples = sft_examples(problems, tokenizer, params.prompts)
        return Texts(len(problems), example_tokens(examples, tokenizer, max_length), problems[0].lang != lang)
    chars = [len(p.question) + len(p.solution or "") for p in problems]
    return Texts(len(problems), [min(round(c / params.plan.chars_per_token), max_length) for c in chars], True)


def prompt_texts(params: Params, dataset: str, lang: str, tokenizer: Any | None) -> Texts:
    problems = _problems(params, dataset, lang)
    if problems is None:
        return _sized(params, dataset)
    limit = params.evaluation.limit
    problems = problems[:limit] if limit and params.datasets[dataset].role == "eval" else problems
    if tokenizer is not None:
        from budget_alignment.prompts import generation_prompt

        ids = tokenizer([generation_prompt(tokenizer, p, params.prompts, lang) for p in problems])["input_ids"]
        return Texts(len(problems), [len(i) for i in ids], estimated=problems[0].lang != lang)
    return Texts(len(problems), [round(len(p.question) / params.plan.chars_per_token) for p in problems], True)


def prior_texts(params: Params, tokenizer: Any | None) -> Texts:
    """The tiny base's reasoning prior as base_model builds it (train/prior.py): each chain asked in every question
    language, reasoned in English; exact with the tokenizer, else estimated from each language's chains."""
    from budget_alignment.train.prior import prior_chains, prior_examples

    prior = params.base_model.reasoning_prior
    max_length = max(prior.training.max_length_for(lang) for lang in prior.question_languages)
    if tokenizer is not None:
        examples = prior_examples(prior_chains(params), tokenizer, prior.question_languages)
        return Texts(len(examples), example_tokens(examples, tokenizer, max_length), estimated=False)
    texts = [training_texts(params, prior.dataset, lang, None, max_length) for lang in prior.question_languages]
    return Texts(sum(t.records for t in texts), [n for t in texts for n in t.tokens], estimated=True)


def grpo_prompt_texts(params: Params, lang: str, tokenizer: Any | None) -> Texts:
    """GRPO's prompts in `lang`: exact once stage grpo_data has written them (the rows GRPO trains on, over-long
    prompts left out), else the mixture of `grpo.datasets`, each dataset's share of it."""
    from budget_alignment.train.grpo_data import mixture_counts

    written = paths.grpo_problems(lang)
    if tokenizer is not None and written.is_file():
        from budget_alignment.records import GrpoProblem
        from budget_alignment.train.grpo import grpo_dataset

        problems = read_records(written, GrpoProblem)
        rows = grpo_dataset(problems, tokenizer, params.prompts, params.grpo.max_prompt_length)
        ids = tokenizer(list(rows["prompt"]), add_special_tokens=False)["input_ids"]
        return Texts(len(ids), [len(i) for i in ids], estimated=False)

    used = [name for name, spec in params.grpo.datasets.items() if spec.weight > 0]
    parts = [prompt_texts(params, name, lang, tokenizer) for name in used]
    counts = mixture_counts([part.records for part in parts], [params.grpo.datasets[name].weight for name in used])
    tokens = [
        part.tokens[i % len(part.tokens)] for part, count in zip(parts, counts, strict=True) for i in range(count)
    ]
    return Texts(sum(counts), tokens, any(part.estimated for part in parts))


def grpo_prompt_draws(records: int, rounds: int, per_round: int, seed: int) -> list[int]:
    """The prompts (indices) GRPO samples its `rounds` batches of rollouts for, `per_round` prompts a batch: drawn by
    the sampler GRPOTrainer builds (TRL's seeded `RepeatSampler`, one pass of it an epoch), its repeats left out."""
    from trl.trainer.utils import RepeatSampler

    sampler = RepeatSampler(range(records), mini_repeat_count=1, batch_size=per_round, shuffle=True, seed=seed)
    drawn: list[int] = []
    while len(drawn) < rounds * per_round:
        drawn += list(sampler)
    return drawn[: rounds * per_round]


def _sized(params: Params, dataset: str) -> Texts:
    size = params.plan.sizes.get(dataset)
    if size is None:
        raise PlanError(f"plan.sizes.{dataset}: its data are not at hand before the run; give records and mean_tokens")
    limit = params.datasets[dataset].limit
    records = min(size.records, limit) if limit else size.records
    return Texts(records, [size.mean_tokens] * records, True)


def trained_examples(
    records: int, training: TrainingParams, seed: int, processes: int, key: str
) -> tuple[int, list[int]]:
    """The trainer's optimizer steps, and the examples (indices, repeats included) they read, in its order.

    Replayed with the loader the Trainer itself builds: accelerate's seeded sampler (a permutation drawn from
    `seed + epoch` each epoch), each process's shard of the batches (the last batch of an epoch filled from its start
    so that every process gets one), and `accumulation` batches per optimizer step (fewer at an epoch's end), until
    `max_steps` or the epochs' steps. So a step count that cuts an epoch counts the examples it really trains on.
    """
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader, RandomSampler

    from budget_alignment.train.trainer_setup import batch_plan

    batch = batch_plan(training.batch_size, training.per_device_batch_size, processes, key)
    indices = range(records)
    loaders = [
        prepare_data_loader(
            DataLoader(indices, sampler=RandomSampler(indices), batch_size=batch.per_device),
            num_processes=processes,
            process_index=rank,
            use_seedable_sampler=True,
            data_seed=seed,
        )
        for rank in range(processes)
    ]
    batches_per_epoch = len(loaders[0])
    steps_per_epoch = math.ceil(batches_per_epoch / batch.accumulation)
    last_step_batches = batches_per_epoch - (steps_per_epoch - 1) * batch.accumulation
    steps = training.max_steps if training.max_steps > 0 else math.ceil(training.num_train_epochs * steps_per_epoch)
    seen: list[int] = []
    for epoch in range(math.ceil(steps / steps_per_epoch)):
        for loader in loaders:
            loader.set_epoch(epoch)
        iterators = [iter(loader) for loader in loaders]
        for step in range(min(steps_per_epoch, steps - epoch * steps_per_epoch)):
            count = last_step_batches if step == steps_per_epoch - 1 else batch.accumulation
            seen += [int(i) for iterator in iterators for _ in range(count) for i in next(iterator)]
    return steps, seen


def seen_tokens(texts: Texts, training: TrainingParams, seed: int, processes: int, key: str) -> tuple[int, int, bool]:
    """(optimizer steps, tokens trained, whether exact)."""
    steps, examples = trained_examples(texts.records, training, seed, processes, key)
    return steps, sum(texts.tokens[i] for i in examples), not texts.estimated


# --- the stages ----------------------------------------------------------------------------------------------------


def processes(params: Params) -> int:
    """The processes each stage runs as: `compute.num_processes`, with `auto` the devices of `plan.throughput`."""
    compute, speed = params.compute.num_processes, params.plan.throughput
    return speed.devices if compute == "auto" else compute


def training_cost(
    params: Params, stage: str, texts: Texts, training: TrainingParams, dtype: str, batch_key: str
) -> StageCost:
    steps, tokens, exact = seen_tokens(texts, training, params.seed, processes(params), batch_key)
    trained = lora_parameters(params, training.lora.r) if training.use_lora else params.plan.model.parameters
    output = trained * DTYPE_BYTES[dtype] if training.use_lora else model_bytes(params, dtype)
    return StageCost(
        stage,
        f"{steps} steps of {training.batch_size} examples ({texts.records} {'LoRA' if training.use_lora else 'full'})",
        train_tokens=tokens,
        output_bytes=output,
        checkpoint_bytes=CHECKPOINTS_KEPT * (output + trained * OPTIMIZER_BYTES_PER_PARAMETER),
        estimated=not exact,
    )


def plan_stages(params: Params) -> list[StageCost]:
    from budget_alignment.train import prior as prior_stage
    from budget_alignment.train import sft as sft_stage
    from budget_alignment.train import topup as topup_stage

    tokenizer = _tokenizer(params)
    dtype = params.base_model.dtype
    costs = [StageCost("base_model", "the base model's weights", output_bytes=model_bytes(params, dtype))]
    prior = params.base_model.reasoning_prior
    if prior is not None:
        cost = training_cost(params, "base_model", prior_texts(params, tokenizer), prior.training, dtype,
                             prior_stage.BATCH_KEY)  # fmt: skip
        costs[0].train_tokens, costs[0].estimated = cost.train_tokens, cost.estimated
        costs[0].work = f"the base model's weights and its reasoning prior ({cost.work})"
        costs[0].checkpoint_bytes = cost.checkpoint_bytes
    translation = StageCost("translate", "")
    parts = []
    for dataset, spec in params.datasets.items():
        machine = [lang for lang, entry in spec.translation.items() if entry.machine is not None]
        english = _problems(params, dataset, "en")
        records = len(english) if english is not None else _sized(params, dataset).records
        parts.append(f"{dataset}: {records} records" + (f" (machine: {', '.join(machine)})" if machine else ""))
        if machine:
            texts = training_texts(params, dataset, "en", tokenizer, 10**9) if english else _sized(params, dataset)
            translation.generated_tokens += sum(texts.tokens) * len(machine)
            translation.estimated = True  # a translation's length is not known before it is made
    translation.work = "; ".join(parts)
    costs.append(translation)
    for lang in params.languages:
        sft = params.sft
        texts = training_texts(params, sft.dataset, lang, tokenizer, sft.max_length_for(lang))
        costs.append(training_cost(params, f"sft@{lang}", texts, sft, dtype, sft_stage.BATCH_KEY))
    topup = params.topup
    for lang in topup.languages:  # the others write a marker
        texts = training_texts(params, topup.dataset, lang, tokenizer, topup.max_length_for(lang))
        costs.append(training_cost(params, f"topup@{lang}", texts, topup, dtype, topup_stage.BATCH_KEY))
    from budget_alignment.train.grpo import sampled_batches

    grpo = params.grpo
    lora_bytes = lora_parameters(params, grpo.lora.r) * DTYPE_BYTES[dtype]
    for init in grpo.init:
        for lang in params.languages:
            texts = grpo_prompt_texts(params, lang, tokenizer)
            # Each sampled batch of rollouts serves `num_iterations` optimizer steps (TRL's epoch repeats each batch
            # as often): trained on at every step, sampled once per that many.
            per_epoch = math.ceil(texts.records / grpo.prompts_per_step)
            if grpo.max_steps > 0:
                steps = grpo.max_steps
                rounds = sampled_batches(steps, grpo.num_iterations)
            else:
                rounds = math.ceil(per_epoch * grpo.num_train_epochs)
                steps = rounds * grpo.num_iterations
            rollouts = grpo.prompts_per_step * grpo.num_generations
            if texts.estimated:  # the mean prompt
                prompt_tokens = rounds * rollouts * sum(texts.tokens) / max(1, len(texts.tokens))
            else:  # the prompts TRL's sampler will draw
                drawn = grpo_prompt_draws(texts.records, rounds, grpo.prompts_per_step, params.seed)
                prompt_tokens = grpo.num_generations * sum(texts.tokens[i] for i in drawn)
            costs.append(
                StageCost(
                    f"grpo@{init}-{lang}",
                    f"{steps} steps of {grpo.prompts_per_step} prompt(s) x {grpo.num_generations} rollouts"
                    + (f", sampled every {grpo.num_iterations} steps" if grpo.num_iterations > 1 else ""),
                    # As TRL counts them (num_input_tokens_seen): each sampled prompt and completion once.
                    train_tokens=round(prompt_tokens + rounds * rollouts * grpo.max_completion_length),
                    train_passes=grpo.num_iterations,
                    generated_tokens=rounds * rollouts * grpo.max_completion_length,
                    output_bytes=lora_bytes,
                    checkpoint_bytes=CHECKPOINTS_KEPT * lora_bytes * (1 + OPTIMIZER_BYTES_PER_PARAMETER // 2),
                    estimated=True,
                )
            )
    if "merge" in params.evaluation.regimes:
        costs.append(StageCost("merge", f"{params.merge.method} of {', '.join(params.merge.members)}",
                               output_bytes=model_bytes(params, params.merge.dtype)))  # fmt: skip
    evaluation = params.evaluation
    for regime in evaluation.regimes:
        langs = params.evaluated_languages(regime)
        problems = sum(prompt_texts(params, d, lang, tokenizer).records for d in evaluation.datasets for lang in langs)
        tokens = problems * evaluation.n * evaluation.max_new_tokens
        costs.append(
            StageCost(
                f"generate@{regime}",
                f"{problems} problems in {len(langs)} languages x {evaluation.n} samples x "
                f"{evaluation.max_new_tokens} tokens at most",
                generated_tokens=tokens,
                output_bytes=tokens * BYTES_PER_GENERATED_TOKEN,
            )
        )
    return costs


def timed(params: Params, costs: Iterable[StageCost]) -> list[StageCost]:
    """Seconds and devices of each stage on the machine of `plan.throughput`."""
    speed = params.plan.throughput
    devices = processes(params)
    timed_costs = []
    for cost in costs:
        cost.devices = devices if (cost.train_tokens or cost.generated_tokens) else 1
        rate = speed.generate_tokens_per_s
        if cost.stage == "translate":
            rate = speed.translate_tokens_per_s
        elif cost.stage.startswith("grpo@"):
            rate = speed.rollout_tokens_per_s or rate
        work = cost.train_tokens * cost.train_passes / speed.train_tokens_per_s + cost.generated_tokens / rate
        cost.seconds = speed.stage_start_s + work / cost.devices
        timed_costs.append(cost)
    return timed_costs


def link_type(root: Path) -> str:
    """The first cache link type of the repository's DVC config (`copy` when none is set)."""
    config = configparser.ConfigParser()
    config.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])
    types = config.get("cache", "type", fallback="copy").strip('"')
    return types.split(",")[0].strip()


def make_plan(params: Params, root: Path | None = None) -> Plan:
    if params.plan is None:
        raise PlanError("plan: this profile has no `plan` section (the base model's shape and the machine's speed)")
    split = split_errors(params, processes(params))
    if split:
        raise PlanError("\n".join(split))
    root = root or paths.repo_root()
    costs = timed(params, plan_stages(params))
    kind = link_type(root)
    outputs = sum(c.output_bytes for c in costs)
    cache = 0 if kind in ("hardlink", "symlink", "reflink") else outputs  # a copy doubles every output
    free = shutil.disk_usage(root).free
    result = Plan(costs, kind, cache, free, params.plan.throughput.device, params.plan.throughput.source)
    if params.merge.method not in MERGE_METHODS:  # pragma: no cover - params validation refuses it first
        raise PlanError(f"merge.method {params.merge.method!r} is unknown")
    return result


def check_disk(plan: Plan, root: Path) -> None:
    if plan.disk_bytes > plan.free_bytes:
        raise PlanError(
            f"the run needs about {plan.disk_bytes / 2**30:.1f} GiB (outputs, the DVC cache as {plan.link_type}, "
            f"a stage's checkpoints) but the file system of {root} has {plan.free_bytes / 2**30:.1f} GiB free"
        )


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def plan_table(plan: Plan) -> str:
    """The plan as a markdown table, with totals and what the figures assume."""
    from budget_alignment.report import markdown_table

    rows = [
        [
            c.stage,
            c.work,
            f"{c.train_tokens:,}" + ("~" if c.estimated and c.train_tokens else ""),
            f"{c.generated_tokens:,}",
            gib(c.output_bytes),
            gib(c.checkpoint_bytes),
            f"{c.seconds:,.0f}",
            f"{c.device_hours:.3f}",
        ]
        for c in plan.stages
    ]
    total_train = sum(c.train_tokens for c in plan.stages)
    total_generated = sum(c.generated_tokens for c in plan.stages)
    rows.append(["**total**", "", f"{total_train:,}", f"{total_generated:,}",
                 gib(sum(c.output_bytes for c in plan.stages)), gib(sum(c.checkpoint_bytes for c in plan.stages)),
                 f"{plan.seconds:,.0f}", f"{sum(c.device_hours for c in plan.stages):.2f}"])  # fmt: skip
    header = ["stage", "work", "tokens trained", "tokens generated (at most)", "output GiB", "checkpoints GiB",
              "seconds", "device-hours"]  # fmt: skip
    return "\n".join(
        [
            markdown_table(header, rows),
            "",
            f"Disk at most: {gib(plan.disk_bytes)} GiB (outputs, the DVC cache as {plan.link_type}: "
            f"{gib(plan.cache_bytes)} GiB of copies, and one stage's checkpoints); {gib(plan.free_bytes)} GiB free.",
            f"Time: {plan.seconds / 3600:.2f} h on {plan.device} ({plan.throughput_source}).",
            "~: estimated (the data or the tokenizer are not at hand before the run, or the text is yet to come).",
        ]
    )
