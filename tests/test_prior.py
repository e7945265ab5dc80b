"""The tiny base's English reasoning prior: its examples, its sources, and the merged model it writes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from budget_alignment import loading, paths, plan, prompts
from budget_alignment.train import prior
from budget_alignment.train import trainer_setup as setup
from test_train_helpers import FAST_SFT, bundled_rows, composed, save_tiny_model, tiny_params, tiny_tokenizer

PRIOR = {"dataset": "chains", "question_languages": ["en", "ja", "fr", "es"], "training": FAST_SFT}


def test_every_question_language_gets_the_english_reasoning_and_its_own_answer_sentence():
    params = tiny_params(**{"base_model.reasoning_prior": PRIOR})
    chains = prior.prior_chains(params)
    assert set(chains) == {"en", "ja", "fr", "es"} and len({len(c) for c in chains.values()}) == 1
    examples = prior.prior_examples(chains, tiny_tokenizer(), ["ja", "fr", "es", "en"])
    assert len(examples) == 4 * len(chains["en"])

    english = prompts.split_solution(chains["en"][0].solution)
    japanese = prompts.split_solution(chains["ja"][0].solution)
    first_ja = examples[0]
    assert chains["ja"][0].question in first_ja["prompt"]
    assert "日本語で順を追って考え" in first_ja["prompt"]  # the instruction still asks for Japanese
    assert first_ja["completion"].startswith(english.reasoning + "\n</think>")
    assert first_ja["completion"].endswith(japanese.final + "<|im_end|>")
    assert japanese.reasoning not in first_ja["completion"]


def test_the_prior_reads_the_sources_not_the_pipelines_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ folder here: the chains come from the bundled source
    params = tiny_params(**{"base_model.reasoning_prior": PRIOR})
    chains = prior.prior_chains(params)
    assert chains["fr"][0].question == bundled_rows("chains", "fr")[0]["question"]


def test_a_question_language_without_a_human_translation_is_refused():
    machine = {"machine": yaml.safe_load(composed())["translate"]}  # what `{machine: ${translate}}` composes to
    params = tiny_params(**{"base_model.reasoning_prior": PRIOR, "datasets.chains.translation": {"ja": machine}})
    with pytest.raises(setup.TrainingError, match=r"no human translation into 'ja' \(datasets.chains.translation"):
        prior.prior_chains(params)


@pytest.mark.slow
def test_the_prior_is_merged_into_the_model_folder_and_trains_the_tokens_the_plan_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the plan reads the base's tokenizer where the pipeline puts it
    monkeypatch.setenv("BUDGET_ALIGNMENT_CACHE", str(tmp_path / ".cache"))
    folder = save_tiny_model(tmp_path / paths.base_model_dir())
    before = load_file(folder / "model.safetensors")
    params = tiny_params(**{"base_model.reasoning_prior": PRIOR})
    (planned,) = [cost for cost in plan.plan_stages(params) if cost.stage == "base_model"]

    metrics = prior.apply_reasoning_prior(params, folder)

    assert metrics["global_step"] == 2 and metrics["examples"] == 120 and metrics["tokens_trained"] > 0
    # Every example mixes languages (the question in one, the reasoning in English): counted as the stage builds it.
    assert not planned.estimated and planned.train_tokens == metrics["tokens_trained"]
    after = load_file(folder / "model.safetensors")
    assert set(after) == set(before)  # a plain model: the LoRA is merged, no adapter weights left
    assert not (folder / "adapter_config.json").exists()
    assert not torch.equal(
        after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # LoRA touches linear layers only
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    model = loading.load_model(folder, params)
    assert not torch.isnan(model(torch.tensor([[1, 2, 3]])).logits).any()
    assert not paths.checkpoints_dir("base_model").exists()
