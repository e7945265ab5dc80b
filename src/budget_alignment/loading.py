"""Loading models safely, in one place for training, merging, generation and translation.

- **Safetensors only.** Pickle checkpoints (`pytorch_model.bin`, `*.pt`, ...) run arbitrary code when unpickled; a
  folder without safetensors weights is refused with an error naming the pickle files, never loaded.
- **Remote code per named model.** A hub model's own Python (`modeling_*.py`) runs only for a model named in the
  top-level `trust_remote_code` list of params. The pipeline's own models (SFT, GRPO, merge) are the base model's
  architecture, so they share the base model's entry.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from budget_alignment.params import Params

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class UnsafeModelError(RuntimeError):
    """A model folder holds only pickle weights, which this project never loads."""


def require_safetensors(folder: str | Path) -> None:
    """Refuse a folder whose weights are pickle files (a LoRA adapter folder needs adapter_model.safetensors).

    A name that is no local folder is a hub id: `use_safetensors=True` makes transformers refuse its pickle weights.
    """
    if not Path(folder).is_dir():
        return
    files = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    adapter = "adapter_config.json" in files
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
    """transformers' "sdpa", except that grouped KV heads go to the kernel as they are (`enable_gqa`) under a mask.

    With a padding mask transformers copies every KV head to each of its query heads (`repeat_kv`) before the
    kernel, because CUDA's fused kernels cannot take both; the CPU kernel can. Those copies were most of a CPU
    decoding step: 1.1 s against 0.7 s for 64 sequences of SmolLM2 (3 KV heads for 9 query heads), with identical
    outputs (benchmarks/generation.py).
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
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
