"""Tiny random-init chat models and projects for the training tests (no download, no `make run`).

The tokenizer is a byte-level BPE trained here on the bundled sample texts (every script the project writes), wrapped
as a ChatML chat tokenizer like SmolLM2's; the model is a 2-layer Llama with hidden size 32.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from budget_alignment import paths, prompts
from budget_alignment.params import Params, PromptParams
from budget_alignment.records import GrpoProblem, Problem, write_records

REPO = Path(__file__).resolve().parents[1]


def worker_threads() -> int:
    """The torch threads of one test process: its worker's share of the cores. pytest-xdist's workers (and the stages
    they start) run side by side, and torch's threads spin while they wait, so two processes of two threads each on
    two cores train several times slower than two of one thread each (benchmarks/thread_sharing.py)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bundled_rows(name: str, lang: str) -> list[dict[str, Any]]:
    text = resources.files("budget_alignment.data").joinpath("bundled", name, f"{lang}.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [
        text
        for name in ("chains", "math")
        for lang in ("en", "ja", "fr", "es")
        for row in bundled_rows(name, lang)
        for text in (row["question"], row.get("solution") or "")
    ]
    corpus += [prompts.instruction(lang, "math") for lang in ("en", "ja", "fr", "es")]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_model(tokenizer, seed: int = 0, hidden: int = 32, kv_heads: int = 2):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    return model


def save_tiny_model(folder: Path, seed: int = 0, hidden: int = 32, kv_heads: int = 2) -> Path:
    """The tiny chat model every model test uses, with its tokenizer, written to `folder`."""
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer, seed, hidden, kv_heads).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_adapter(folder: Path, parent: Path) -> Path:
    """A LoRA adapter on the model in `parent` that changes it (random B), recording `parent` as written (a relative
    `data/models/...` path, as a training stage records it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(parent), config)
    adapted.peft_config["default"].base_model_name_or_path = str(parent)
    adapted.save_pretrained(folder)
    return folder


def problems(name: str, lang: str, limit: int | None = None) -> list[Problem]:
    """Bundled items as the data stages would write them (the params name each dataset after its bundled set)."""
    rows = bundled_rows(name, lang)[:limit]
    return [Problem(dataset=name, lang=lang, **row) for row in rows]


@cache
def composed(*overrides: str) -> str:
    """conf/ composed as `dvc exp run -S ...` composes it (the tiny profile unless overridden), as YAML text."""
    import tempfile

    from budget_alignment.cli import compose

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "params.yaml"
        compose(out, REPO / "conf", list(overrides))
        return out.read_text()


def tiny_params(**sections: Any) -> Params:
    """The tiny profile's params with some sections updated (nested keys merged), validated again."""
    data = yaml.safe_load(composed())
    data["tracking"]["enabled"] = False  # unless a test asks for it
    data["compute"]["torch_threads"] = worker_threads()  # the stages set their threads from params
    # Derived from the keys changed below, as Hydra derives it when it composes (a project's dvc.yaml reads it).
    del data["stage_instances"]
    for section, changes in sections.items():
        target = data
        *parents, last = section.split(".")
        for part in parents:
            target = target[part]
        target[last] = {**(target.get(last) or {}), **changes} if isinstance(changes, dict) else changes
    params = Params.model_validate(data)
    return params.model_copy(update={"stage_instances": params.derived_stage_instances()})


FAST_SFT = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
    "learning_rate": 1e-2,
    "num_train_epochs": 1,
    "max_steps": 2,
    "batch_size": 2,
    "per_device_batch_size": 2,
    "max_length": {"default": 256},
    "save_steps": 1,
    "logging_steps": 1,
}
FAST_TOPUP = FAST_SFT | {"max_steps": 1}
FAST_GRPO = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
    "learning_rate": 1e-2,
    "num_generations": 2,
    "prompts_per_step": 1,
    "per_device_batch_size": 2,
    "max_completion_length": 12,
    "max_prompt_length": 256,
    "max_steps": 1,
    "num_iterations": 1,  # every step generates: the tests count rollouts per step, whatever the tiny profile reuses
    "save_steps": 1,
    "logging_steps": 1,
    "scale_rewards": "none",
}


def make_project(root: Path, langs: tuple[str, ...] = ("ja",), limit: int = 6) -> None:
    """A project folder with a tiny base model and the normalized chains and math problems of `langs`, and what the
    recipe's topup@{lang} and grpo_data@{lang} write: no top-up (the marker), GRPO's prompts the math problems."""
    from budget_alignment.train import outputs

    save_tiny_model(root / paths.base_model_dir())
    for lang in langs:
        outputs.publish_switched_off(root / paths.model_dir(f"topup-{lang}"))
        write_records(root / paths.normalized("chains", lang), problems("chains", lang, limit))
        write_records(root / paths.normalized("math", lang), problems("math", lang, limit))
        write_records(
            root / paths.grpo_problems(lang),
            [GrpoProblem(**p.model_dump(), domain="math") for p in problems("math", lang, limit)],
        )


def write_params(path: Path, params: Params) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), allow_unicode=True))
    return path


def enter_project(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny project made the working directory, its checkpoints under it (the test modules' `project` fixture)."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("BUDGET_ALIGNMENT_CACHE", str(root / ".cache"))
    make_project(root)
    return root


def subprocess_env(root: Path) -> dict[str, str]:
    # Its threads come with the environment: the worker's share of the cores (tests/conftest.py).
    return {**os.environ, "BUDGET_ALIGNMENT_CACHE": str(root / ".cache")}


def wait_for(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    """Poll `condition` while a stage runs in `process` (to kill it at the right moment)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the stage ended (status {process.returncode}) before the condition was met")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def complete_checkpoints(folder: Path, exclude: frozenset[Path] = frozenset()) -> list[Path]:
    """The complete checkpoints under a stage's checkpoint folder (one folder per fingerprint), oldest first; none of
    the fingerprint folders in `exclude`. Complete as a resumed run judges it: a kill is timed on these."""
    from budget_alignment.train import checkpoints

    found = [c for c in folder.glob(f"*/{checkpoints.CHECKPOINT_PREFIX}*") if c.parent not in exclude]
    return sorted(filter(checkpoints.is_complete, found), key=checkpoints.checkpoint_step)


# --- the helpers themselves -----------------------------------------------------------------------------------------


def test_tiny_tokenizer_round_trips_every_script_and_renders_chatml():
    tokenizer = tiny_tokenizer()
    text = "さくらさんは 12 個。Léa a 5 pommes. ¿Cuánto? \\boxed{15}"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    problem = problems("chains", "ja", 1)[0]
    prompt = prompts.generation_prompt(tokenizer, problem, PromptParams())
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])[0] == "<|im_start|>"


def test_tiny_params_merge_nested_changes():
    params = tiny_params(sft=FAST_SFT, grpo={"clip_high": 0.3})
    assert params.sft.lora.r == 4 and params.sft.dataset == yaml.safe_load(composed())["sft"]["dataset"]
    assert params.grpo.clip_high == 0.3
