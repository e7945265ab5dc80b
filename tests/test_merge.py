"""The merge stage on pico models: a linear equal-weight merge is the exact mean; LoRA members are applied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from budget_alignment import merge, paths
from budget_alignment.params import load_params
from test_train_helpers import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUDGET_ALIGNMENT_CACHE", str(tmp_path / ".cache"))
    base = paths.base_model_dir()
    save_tiny_model(base, seed=0)
    for seed, lang in enumerate(["ja", "fr"], start=1):
        save_tiny_model(paths.model_dir(f"sft-{lang}"), seed=seed)
    return tmp_path


def params_with(**merge_changes):
    params = load_params(REPO / "params.yaml")
    return params.model_copy(update={"merge": params.merge.model_copy(update=merge_changes)})


@pytest.mark.slow
def test_linear_equal_merge_is_the_exact_mean_and_loads(project):
    members = ["base", "sft-ja", "sft-fr"]
    out = paths.model_dir("merge")
    merge.merge_models(params_with(members=members), out)

    merged = weights(out)
    inputs = [weights(paths.model_dir(name)) for name in members]
    assert set(merged) == set(inputs[0])
    for name, tensor in merged.items():
        expected = sum(member[name] for member in inputs) / len(inputs)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)

    model = LlamaForCausalLM.from_pretrained(out)
    assert not torch.isnan(model(torch.tensor([[1, 2, 3]])).logits).any()
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert yaml.safe_load((out / merge.CONFIG_FILE).read_text())["merge_method"] == "linear"


@pytest.mark.slow
def test_a_lora_member_is_applied_to_the_base(project):
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM.from_pretrained(paths.base_model_dir())
    adapted = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(7)
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            param.data.normal_()  # lora_B starts at zero: make the adapter change something
    adapter_dir = paths.model_dir("sft-es")
    adapted.save_pretrained(adapter_dir)
    expected_es = {k: v.clone() for k, v in adapted.merge_and_unload().state_dict().items()}

    assert merge.member_reference("sft-es") == f"{paths.base_model_dir()}+{adapter_dir}"
    out = paths.model_dir("merge")
    merge.merge_models(params_with(members=["base", "sft-es"]), out)

    merged = weights(out)
    base_weights = weights(paths.base_model_dir())
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[q], (base_weights[q] + expected_es[q]) / 2, rtol=0, atol=1e-5)
    assert not torch.equal(merged[q], base_weights[q])


def test_a_missing_member_names_the_member_and_its_folder(project):
    with pytest.raises(
        merge.MergeError, match=r"merge.members: 'sft-es': no model at data/models/sft/es \(run its stage first\)"
    ):
        merge.merge_configuration(params_with(members=["base", "sft-es"]))


def test_ties_takes_the_first_member_as_base_and_method_parameters(project):
    config = merge.merge_configuration(
        params_with(method="ties", members=["base", "sft-ja", "sft-fr"], parameters={"density": 0.5})
    )
    assert config["base_model"] == "data/models/base"
    assert [m["model"] for m in config["models"]] == ["data/models/sft/ja", "data/models/sft/fr"]
    assert config["parameters"] == {"normalize": True, "density": 0.5}
