"""Adapters on their true parent, and one BOS token: the paper profile's GRPO-from-SFT and R1-Distill's template.

In the paper profile SFT is a full fine-tune and GRPO puts a fresh LoRA on that SFT model: the adapter must be
sampled, merged and served on the SFT model, never on the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, processors
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from budget_alignment import loading, merge, paths, prompts
from budget_alignment.evaluation import generate
from budget_alignment.params import PromptParams
from budget_alignment.records import Problem
from budget_alignment.train import grpo, sft
from conftest import FIXTURES
from test_train_helpers import FAST_GRPO, FAST_SFT, enter_project, problems, tiny_params


@pytest.fixture
def project(tmp_path, monkeypatch):
    return enter_project(tmp_path, monkeypatch)


def randomize_lora_b(adapter: Path) -> None:
    """A one-step GRPO on a random model leaves LoRA B at zero (constant rewards): give it weights that matter."""
    weights = load_file(adapter / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(3)
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(weights, adapter / "adapter_model.safetensors")


def greedy(params, model_dir: Path, texts: list[str]) -> list[str]:
    backend = generate.TransformersBackend(params, model_dir)
    return [samples[0].text for samples in backend.generate(texts, 1, seed=0)]


def test_a_grpo_lora_on_a_full_sft_model_is_sampled_merged_and_served_on_that_model(project):
    params = tiny_params(
        sft=FAST_SFT | {"use_lora": False},
        grpo=FAST_GRPO,
        evaluation={"temperature": 0.0, "max_new_tokens": 12, "n": 1, "k": [1]},
    )
    sft.train_sft(params, "ja")
    full_sft = paths.model_dir("sft-ja")
    assert not loading.is_adapter(full_sft)
    grpo.train_grpo(params, "sft", "ja")
    adapter = paths.model_dir("grpo_sft-ja")
    assert loading.adapter_parent(adapter) == full_sft  # recorded by the stage, relative to the repository
    randomize_lora_b(adapter)

    from peft import PeftModel

    merged_dir = project / "merged"
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(full_sft), adapter).merge_and_unload()
    merged.save_pretrained(merged_dir)
    loading.load_model_tokenizer(adapter, params).save_pretrained(merged_dir)

    tokenizer = loading.load_model_tokenizer(adapter, params)
    texts = [prompts.generation_prompt(tokenizer, p, PromptParams()) for p in problems("math", "ja", 3)]
    on_parent = greedy(params, adapter, texts)
    assert on_parent == greedy(params, merged_dir, texts)
    # What the evaluation measured before adapters knew their parent: base + adapter, a different model.
    on_base = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(paths.base_model_dir()), adapter)
    on_base.merge_and_unload().save_pretrained(project / "on_base")
    tokenizer.save_pretrained(project / "on_base")
    assert greedy(params, project / "on_base", texts) != on_parent

    engine = generate.vllm_engine(params, adapter)
    assert engine.model == full_sft.resolve() and engine.adapter == adapter.resolve()
    assert engine.options["enable_lora"] and engine.options["max_lora_rank"] >= FAST_GRPO["lora"]["r"]
    whole = generate.vllm_engine(params, full_sft)
    assert whole.model == full_sft.resolve() and whole.adapter is None and "enable_lora" not in whole.options
    assert merge.member_reference("grpo_sft-ja") == f"{full_sft}+{adapter}"


def test_an_adapter_whose_parent_is_missing_or_outside_the_pipeline_is_refused(project):
    params = tiny_params(sft=FAST_SFT)
    sft.train_sft(params, "ja")
    adapter = paths.model_dir("sft-ja")
    assert loading.adapter_parent(adapter) == paths.base_model_dir()
    # PEFT lists all-linear's modules from a set: written sorted, the same adapter is the same output in any process.
    modules = json.loads((adapter / loading.ADAPTER_CONFIG).read_text())["target_modules"]
    assert len(modules) > 1 and modules == sorted(modules)
    loading.record_adapter_parent(adapter, "/somewhere/else")
    with pytest.raises(loading.ModelFolderError, match="is not a folder of the pipeline's models"):
        loading.load_model(adapter, params)
    loading.record_adapter_parent(adapter, paths.model_dir("sft-fr"))
    with pytest.raises(loading.ModelFolderError, match=r"parent model data/models/sft/fr is missing"):
        generate.vllm_engine(params, adapter)


# --- one BOS token -------------------------------------------------------------------------------------------------

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def bos_adding_tokenizer() -> PreTrainedTokenizerFast:
    """R1-Distill's case: the chat template writes `{{bos_token}}` and the tokenizer adds BOS by itself too."""
    words = ["<unk>", "<pad>", BOS, EOS, "<think>", "</think>", "1", "2", "3", "x"]
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (FIXTURES / "deepseek_r1_distill_chat_template.jinja").read_text()
    return tokenizer


def test_prompts_reach_both_backends_with_exactly_one_bos(tmp_path, monkeypatch):
    tokenizer = bos_adding_tokenizer()
    problem = Problem(id="q", dataset="math", lang="ja", question="1 x 2", answer="2", answer_type="math")
    text = prompts.generation_prompt(tokenizer, problem, PromptParams())
    assert text.startswith(BOS) and tokenizer(text)["input_ids"].count(2) == 2  # what adding special tokens does
    bos_id = tokenizer.bos_token_id

    (request,) = generate.vllm_prompts(tokenizer, [text])
    assert request["prompt_token_ids"][:2].count(bos_id) == 1 and request["prompt_token_ids"][0] == bos_id

    # The transformers backend: the ids its model is given for the prompt.
    monkeypatch.chdir(tmp_path)
    folder = paths.base_model_dir()
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    params = tiny_params(evaluation={"max_new_tokens": 2, "n": 1, "k": [1], "temperature": 0.0})
    backend = generate.TransformersBackend(params, folder)
    seen: list[list[int]] = []
    backend.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    backend.generate([text], 1, seed=0)
    prompt_ids = [token for token in seen[0] if token != tokenizer.pad_token_id]
    assert prompt_ids[0] == bos_id and prompt_ids.count(bos_id) == 1


def test_an_adapter_config_is_the_same_bytes_whatever_the_process(tmp_path):
    # PEFT saves `all-linear` resolved as a set, in the order of the process's string hashes.
    config = {"base_model_name_or_path": "x", "target_modules": ["v_proj", "q_proj", "down_proj"], "r": 8}
    written = []
    for order in (config["target_modules"], sorted(config["target_modules"], reverse=True)):
        (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": order}))
        loading.record_adapter_parent(tmp_path, paths.base_model_dir())
        written.append((tmp_path / "adapter_config.json").read_bytes())
    assert written[0] == written[1]
    assert json.loads(written[0])["target_modules"] == ["down_proj", "q_proj", "v_proj"]
