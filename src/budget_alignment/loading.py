"""Loading models safely, in one place for training, merging, generation and translation.

- **Safetensors only.** Pickle checkpoints (`pytorch_model.bin`, `*.pt`, ...) run arbitrary code when unpickled; a
  folder without safetensors weights is refused with an error naming the pickle files, never loaded.
- **Remote code per named model.** A hub model's own Python (`modeling_*.py`) runs only for a model named in the
  top-level `trust_remote_code` list of params. The pipeline's own models (SFT, GRPO, merge) are the base model's
  architecture, so they share the base model's entry.
- **One precision.** Where `compute.mixed_precision` says so (`bf16_mixed_precision`), training computes in bf16
  under autocast, its weights staying in `base_model.dtype`, and the evaluation samples from the weights in bf16.
- **Adapters on their true parent.** A LoRA adapter folder records the model it was trained on
  (`base_model_name_or_path` in `adapter_config.json`, a path inside the pipeline's models folder): the base for a
  LoRA SFT or a GRPO from the base, the full SFT model for a GRPO on a fully fine-tuned SFT model. Everything that
  loads an adapter loads it on that parent.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from budget_alignment import paths
from budget_alignment.errors import StageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from budget_alignment.params import ComputeParams, Params

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class UnsafeModelError(StageError, RuntimeError):
    """A model folder holds only pickle weights, which this project never loads."""


class ModelFolderError(StageError, RuntimeError):
    """A model folder is missing, or an adapter's parent model is not where the adapter says."""


class DeviceError(StageError, RuntimeError):
    """The params ask for a device this machine does not have."""


# --- model folders --------------------------------------------------------------------------------------------------


def is_adapter(folder: str | Path) -> bool:
    """A PEFT LoRA adapter folder (applied on its parent model), as opposed to a whole model folder."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def require_model(folder: str | Path, what: str) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file() and not is_adapter(folder):
        raise ModelFolderError(f"{what}: no model at {folder} (run its stage first)")
    return folder


def adapter_parent(folder: str | Path) -> Path:
    """The whole model an adapter was trained on: relative to the repository, inside the models folder, present."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path") or ""
    parent = Path(recorded)
    models = paths.models_dir().parts
    if parent.is_absolute() or parent.parts[: len(models)] != models or len(parent.parts) == len(models):
        raise ModelFolderError(
            f"{folder}: the adapter's parent model {recorded!r} is not a folder of the pipeline's models "
            f"({paths.models_dir()}/...); an adapter written by a training stage records one"
        )
    if not (parent / "config.json").is_file():
        raise ModelFolderError(f"{folder}: the adapter's parent model {parent} is missing (run its stage first)")
    return parent


def record_adapter_parent(folder: str | Path, parent: str | Path) -> None:
    """Write the parent model (a path relative to the repository) into an adapter folder.

    The file is written in a stable form: PEFT lists `target_modules` from a set, in an order that changes from one
    process to the next, which would make the same adapter a different output.
    """
    config_file = Path(folder) / ADAPTER_CONFIG
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = Path(parent).as_posix()
    if isinstance(config.get("target_modules"), list):
        # PEFT writes a set (`all-linear` resolved) in an order that changes from process to process: same inputs
        # would give other bytes, and DVC would rerun everything below the model.
        config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def weights_folder(folder: str | Path) -> Path:
    """The whole model under a folder: the folder itself, or the parent an adapter applies to."""
    return adapter_parent(folder) if is_adapter(folder) else Path(folder)


# --- devices ---------------------------------------------------------------------------------------------------------


def gpu_available(compute: ComputeParams) -> bool:
    """Whether to run on a CUDA GPU: never for `device: cpu`, an error for `device: cuda` without one."""
    if compute.device == "cpu":
        return False
    import torch

    available = torch.cuda.is_available()
    if compute.device == "cuda" and not available:
        raise DeviceError("compute.device is cuda, but no CUDA GPU is visible")
    return available


# /proc/cpuinfo's names of bf16 arithmetic: x86's AVX512-BF16 and AMX, Arm's BF16.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@cache
def cpu_computes_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bf16 arithmetic (Linux's /proc/cpuinfo lists it; elsewhere: taken as not)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {
        flag
        for line in text.splitlines()
        if line.partition(":")[0].strip() in ("flags", "Features")
        for flag in line.partition(":")[2].split()
    }
    return bool(flags & CPU_BF16_FLAGS)


def bf16_mixed_precision(compute: ComputeParams) -> bool:
    """Whether models compute in bf16 (`compute.mixed_precision`; params.py says why)."""
    if compute.mixed_precision != "auto":
        return compute.mixed_precision == "bf16"
    if gpu_available(compute):
        import torch

        return torch.cuda.is_bf16_supported()
    return cpu_computes_bf16()


def require_safetensors(folder: str | Path) -> None:
    """Refuse a folder whose weights are pickle files (a LoRA adapter folder needs adapter_model.safetensors).

    A name that is no local folder is a hub id: `use_safetensors=True` makes transformers refuse its pickle weights.
    """
    if not Path(folder).is_dir():
        return
    files = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    adapter = ADAPTER_CONFIG in files
    if (ADAPTER_WEIGHTS in files) if adapter else any(name.endswith(".safetensors") for name in files):
        return
    pickles = [name for name in files if Path(name).suffix in PICKLE_SUFFIXES]
    found = "it holds no weights"
    if pickles:
        found = f"it holds pickle weights ({', '.join(pickles)}), which can run arbitrary code when loaded"
    raise UnsafeModelError(
        f"{folder}: only safetensors weights are loaded, and {found}; "
        "use a revision that publishes .safetensors or convert the weights with a tool you trust"
    )


def trusts_remote_code(params: Params, model: str | None = None) -> bool:
    """Whether `model` (default: the base model and every model trained from it) may run its own code."""
    return (model or params.base_model_name()) in params.trust_remote_code


def load_causal_lm(
    folder: Path, dtype: Any = "auto", *, trust_remote_code: bool = False, on_cpu: bool = False
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    require_safetensors(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if on_cpu and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(grouped_sdpa())
    return model


GROUPED_SDPA = "sdpa_grouped_kv"


def _grouped_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' "sdpa", except that grouped KV heads go to the kernel as they are (`enable_gqa`) under a mask,
    and a decoding step (one new token per sequence) is two matmuls per KV head.

    With a padding mask transformers copies every KV head to each of its query heads (`repeat_kv`) before the
    kernel, because CUDA's fused kernels cannot take both; the CPU kernel can, and the copies were most of a CPU
    decoding step, with identical outputs. For one query token that kernel is slower than two matmuls, by far in bf16
    (benchmarks/generation.py; figures in benchmarks/RESULTS.md).
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[2] == 1 and not kwargs.get("dropout"):
        return _decoding_step_attention(query, key, value, attention_mask, kwargs.get("scaling")), None
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=kwargs.get("dropout", 0.0),
        scale=kwargs.get("scaling"),
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


def _decoding_step_attention(query, key, value, mask, scale):
    """Attention of one query token per sequence: each KV head's query heads as a group (no copies of K and V), the
    scores' softmax in float32. Returns (batch, 1, heads, dim), as the attention interface does."""
    import torch

    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (scale if scale is not None else dim**-0.5)
    mask = mask[..., -length:].reshape(batch, 1, 1, length)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    output = torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)
    return output.reshape(batch, 1, heads, dim)


@cache
def grouped_sdpa() -> str:
    """Register the grouped-KV attention (and its mask, sdpa's) with transformers; its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa_forward)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    return GROUPED_SDPA


def load_adapter(model: PreTrainedModel, folder: Path, *, trainable: bool = False) -> PreTrainedModel:
    """A LoRA adapter folder on top of `model`, unmerged."""
    from peft import PeftModel

    require_safetensors(folder)
    return PeftModel.from_pretrained(model, folder, is_trainable=trainable)


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False, **options: Any) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **options)


def load_model(folder: str | Path, params: Params, *, trainable: bool = False) -> PreTrainedModel:
    """A pipeline model folder, or an adapter folder on top of its parent, in the params' dtype and device kind.

    `trainable` leaves an adapter's weights trainable (GRPO from a LoRA SFT model continues the SFT adapter).
    """
    import torch

    folder = require_model(folder, "model")
    if is_adapter(folder):
        return load_adapter(load_model(adapter_parent(folder), params), folder, trainable=trainable)
    return load_causal_lm(
        folder,
        getattr(torch, params.base_model.dtype),
        trust_remote_code=trusts_remote_code(params),
        on_cpu=not gpu_available(params.compute),
    )


def load_model_tokenizer(folder: str | Path, params: Params, **options: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a pipeline model (an adapter folder carries its own), with a padding token."""
    folder = Path(folder)
    if not (folder / "tokenizer_config.json").is_file() and is_adapter(folder):
        folder = adapter_parent(folder)
    tokenizer = load_tokenizer(folder, trust_remote_code=trusts_remote_code(params), **options)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
