"""The merge stage on pico models: every method runs and does what it says (a linear equal-weight merge is the exact
mean, task arithmetic adds the differences, TIES and DARE trim them, SLERP interpolates two members); LoRA members,
GRPO ones included, are applied on their recorded parent; GRPO members reach the merge's DVC deps only when named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from budget_alignment import loading, merge, paths
from budget_alignment.params import MergeParams, load_params
from budget_alignment.stages import STAGES
from test_stages import needed_files
from test_train_helpers import save_tiny_adapter, save_tiny_model

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
    """The committed params with `merge` changed (validated: what each method needs is checked)."""
    params = load_params(REPO / "params.yaml")
    settings = MergeParams.model_validate(params.merge.model_dump() | merge_changes)
    return params.model_copy(update={"merge": settings})


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


# --- every method, on pico models ----------------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj.weight"
MEMBERS = ["base", "sft-ja", "sft-fr"]
METHODS = {
    "linear": {},
    "task_arithmetic": {"normalize": False},
    "ties": {"parameters": {"density": 0.5}},
    "dare_ties": {"parameters": {"density": 0.5}},
    "dare_linear": {"parameters": {"density": 0.5}},
    "slerp": {"members": ["sft-ja", "sft-fr"], "parameters": {"t": 0.3}},
}


def merged(name: str = "merge", **changes) -> dict[str, torch.Tensor]:
    out = paths.models_dir() / name
    merge.merge_models(params_with(**{"members": MEMBERS, **changes}), out)
    return weights(out)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_into_a_model_that_loads(project, method):
    out = paths.model_dir("merge")
    merge.merge_models(params_with(**{"members": MEMBERS, "method": method, **METHODS[method]}), out)
    model = LlamaForCausalLM.from_pretrained(out)
    assert not torch.isnan(model(torch.tensor([[1, 2, 3]])).logits).any()
    assert yaml.safe_load((out / merge.CONFIG_FILE).read_text())["merge_method"] == method


@pytest.mark.slow
def test_task_arithmetic_adds_the_weighted_differences_to_the_base(project):
    base, ja, fr = (weights(paths.model_dir(name)) for name in MEMBERS)
    result = merged(method="task_arithmetic", normalize=False, weights=[1.0, 1.0, 0.5])
    torch.testing.assert_close(result[Q], base[Q] + (ja[Q] - base[Q]) + 0.5 * (fr[Q] - base[Q]), rtol=0, atol=1e-5)
    scaled = merged(method="task_arithmetic", normalize=False, parameters={"lambda": 0.5})
    torch.testing.assert_close(scaled[Q], base[Q] + 0.5 * (ja[Q] + fr[Q] - 2 * base[Q]), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ties_and_dare_trim_the_differences_and_dare_is_seeded(project):
    base = weights(paths.base_model_dir())
    linear = merged(method="task_arithmetic")  # the base plus the mean difference, nothing trimmed
    ties = merged(method="ties", parameters={"density": 0.5})
    # TIES keeps half of each difference (the largest) and elects a sign per weight: not the plain mean.
    assert not torch.allclose(ties[Q], linear[Q])
    kept = (ties[Q] != base[Q]).float().mean().item()
    assert 0.4 < kept < 0.9, kept  # weights where one member or both keep a difference
    dare = merged(method="dare_ties", parameters={"density": 0.5})
    again = merged("again", method="dare_ties", parameters={"density": 0.5})
    assert not torch.allclose(dare[Q], linear[Q]) and not torch.allclose(dare[Q], ties[Q])
    assert all(torch.equal(dare[name], again[name]) for name in dare)  # same seed, same bytes: a pure output
    params = params_with(members=MEMBERS, method="dare_ties", parameters={"density": 0.5})
    merge.merge_models(params.model_copy(update={"seed": params.seed + 1}), paths.models_dir() / "reseeded")
    assert not torch.equal(weights(paths.models_dir() / "reseeded")[Q], dare[Q])


@pytest.mark.slow
def test_slerp_runs_from_its_first_member_at_t_0_to_its_second_at_t_1(project):
    ja, fr = weights(paths.model_dir("sft-ja")), weights(paths.model_dir("sft-fr"))
    for t, expected in ((0.0, ja), (1.0, fr)):
        result = merged(f"slerp-{t}", method="slerp", members=["sft-ja", "sft-fr"], parameters={"t": t})
        for name in expected:
            torch.testing.assert_close(result[name], expected[name], rtol=0, atol=1e-5)
    middle = merged(method="slerp", members=["sft-ja", "sft-fr"], parameters={"t": 0.5})
    assert not torch.allclose(middle[Q], ja[Q]) and not torch.allclose(middle[Q], fr[Q])


def lora_on(parent: Path, folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA adapter on `parent`, saved to `folder` with its parent recorded; the weights it gives."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(parent), LoraConfig(r=2, lora_alpha=4))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    model.save_pretrained(folder)
    loading.record_adapter_parent(folder, parent)
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.slow
def test_grpo_members_are_merged_on_their_parent_and_recorded_for_the_merge_stage(project):
    """A GRPO-from-SFT adapter on a fully fine-tuned SFT model (the paper's shape), weighted 3:1 against the base."""
    expected = lora_on(paths.model_dir("sft-ja"), paths.model_dir("grpo_sft-ja"), seed=3)
    params = params_with(members=["base", "grpo_sft-ja"], grpo_inits=["sft"], weights=[1.0, 3.0])

    digests = merge.record_merge_members(params, "sft")
    assert set(digests) == {"grpo_sft-ja"}
    assert json.loads(paths.merge_members_file("sft").read_text()) == digests
    adapter = paths.model_dir("grpo_sft-ja") / loading.ADAPTER_WEIGHTS
    trained = adapter.read_bytes()
    adapter.write_bytes(trained + b" ")  # another GRPO model: another digest, so the merge reruns
    assert merge.record_merge_members(params, "sft") != digests
    adapter.write_bytes(trained)

    result = merged(members=["base", "grpo_sft-ja"], grpo_inits=["sft"], weights=[1.0, 3.0])
    base = weights(paths.base_model_dir())
    torch.testing.assert_close(result[Q], (base[Q] + 3 * expected[Q]) / 4, rtol=0, atol=1e-5)
    with pytest.raises(merge.MergeError, match=r"merge\.grpo_inits has no 'base'"):
        merge.record_merge_members(params, "base")


# --- the DVC wiring: GRPO models reach the merge only when it takes them -------------------------------------------


def merge_graph(tmp_path: Path, **merge_changes) -> tuple[dict, object]:
    """dvc.yaml over params with `merge` changed: the stages by name and DVC's graph."""
    from dvc.repo import Repo

    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["merge"].update(merge_changes)
    root = tmp_path / "repo"
    (root / ".dvc").mkdir(parents=True)
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    repo = Repo(str(root), uninitialized=True)
    return {stage.name: stage for stage in repo.index.stages}, repo.index.graph


def upstream(graph, stage) -> set[str]:
    import networkx as nx

    return {node.name for node in nx.descendants(graph, stage)}


def test_the_merge_depends_on_grpo_models_only_when_it_takes_them(tmp_path):
    stages, graph = merge_graph(tmp_path / "default")
    assert not any(name.startswith("merge_members") for name in stages)
    assert not any(name.startswith("grpo@") for name in upstream(graph, stages["merge"]))
    assert "data/merge_members" in {dep.def_path for dep in stages["merge"].deps}

    stages, graph = merge_graph(
        tmp_path / "grpo", members=["base", "grpo_sft-ja", "grpo_sft-fr"], grpo_inits=["sft"], method="ties",
        parameters={"density": 0.5},
    )  # fmt: skip
    assert {"merge_members@sft", "grpo@sft-ja", "grpo@sft-fr", "grpo@sft-es"} <= upstream(graph, stages["merge"])
    assert not any(name.startswith("grpo@base") for name in upstream(graph, stages["merge"]))
    # The stage that exists only here is held to what tests/test_stages.py holds the others to.
    members = stages["merge_members@sft"]
    deps = {dep.def_path for dep in members.deps if not hasattr(dep, "params")}
    assert deps == {"data/models/grpo_sft", *needed_files("merge-members")}
    assert [key for dep in members.deps if hasattr(dep, "params") for key in dep.params] == list(
        STAGES["merge_members"].params
    )
    assert (REPO / "data/merge_members/.gitignore").read_text().count("/grpo_sft.json") == 1


@pytest.mark.slow
def test_the_merged_folder_is_a_function_of_its_inputs_whatever_the_hash_seed(project):
    """mergekit keeps its members in a set: its tokenizer donor and model card followed the process's hash seed."""
    save_tiny_model(paths.model_dir("sft-ja"), seed=1)
    save_tiny_adapter(paths.model_dir("sft-es"), paths.base_model_dir())
    params = load_params(REPO / "params.yaml").model_dump(mode="json")
    params["tracking"]["enabled"] = False
    params["merge"]["members"] = ["base", "sft-ja", "sft-fr", "sft-es"]
    Path("params.yaml").write_text(yaml.safe_dump(params))
    outputs = []
    for seed in ("1", "2"):  # two member orders in mergekit's set, two temporary folders
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-m", "budget_alignment.cli", "merge"], env=env, capture_output=True)
        assert result.returncode == 0, result.stderr[-3000:]
        out = paths.model_dir("merge")
        outputs.append({path.name: path.read_bytes() for path in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
