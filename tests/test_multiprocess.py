"""`budget-align sft` with compute.num_processes=2 re-launches itself under `accelerate launch` (gloo on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from budget_alignment import paths
from budget_alignment.train import launch
from test_train_helpers import FAST_SFT, REPO, enter_project, subprocess_env, tiny_params, write_params


@pytest.fixture
def project(tmp_path, monkeypatch):
    return enter_project(tmp_path, monkeypatch)


@pytest.mark.slow
def test_sft_on_two_cpu_processes_under_accelerate_launch(project):
    # 6 chains, 2 per process and step: one epoch is 2 steps on 2 processes (it would be 3 on one).
    params = tiny_params(
        compute={"num_processes": 2, "accelerate_config": "conf/accelerate/ddp.yaml", "torch_threads": 1},
        sft=FAST_SFT | {"max_steps": -1, "num_train_epochs": 1},
    )
    (project / "conf/accelerate").mkdir(parents=True)
    (project / "conf/accelerate/ddp.yaml").write_text((REPO / "conf/accelerate/ddp.yaml").read_text())
    params_file = write_params(project / "params.yaml", params)

    result = subprocess.run(
        [sys.executable, "-m", "budget_alignment.cli", "-v", "sft", "ja", "--params", str(params_file)],
        cwd=project,
        env=subprocess_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "launching 2 processes" in result.stderr
    assert "accelerate.commands.launch" in result.stderr
    assert "training on 2 processes (MULTI_CPU)" in result.stderr

    metrics = json.loads(paths.training_metrics_file("sft@ja").read_text())
    assert metrics["global_step"] == 2 and metrics["tokens_trained"] > 0
    assert (paths.model_dir("sft-ja") / "adapter_model.safetensors").is_file()
    # The launching process tracked the stage and took the ranks' figures into its budget.
    budget = json.loads(paths.budget_file("sft@ja").read_text())
    assert budget["tokens_trained"] == metrics["tokens_trained"]
    assert not list(paths.models_dir().glob(".*"))  # no staging or temporary folders left behind


@pytest.mark.parametrize(
    ("name", "distributed_type"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero3", "DEEPSPEED")]
)
def test_the_shipped_accelerate_configs_load_and_save_loadable_models(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / f"conf/accelerate/{name}.yaml"))
    assert config.distributed_type.value == distributed_type and config.num_machines == 1
    # The published model must be one loadable folder, not per-rank shards.
    if name == "fsdp":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if name == "zero3":
        assert config.deepspeed_config["zero3_save_16bit_model"] is True


def test_the_relaunch_runs_the_same_command_under_accelerate_launch():
    params = tiny_params(compute={"num_processes": 4, "accelerate_config": "conf/accelerate/zero3.yaml"})
    command = launch.relaunch_command(params.compute, ["grpo", "sft", "fr", "--params", "p.yaml"])
    assert command[1:] == [
        "-m", "accelerate.commands.launch", "--config_file", "conf/accelerate/zero3.yaml", "--num_processes", "4",
        "-m", "budget_alignment.cli", "grpo", "sft", "fr", "--params", "p.yaml",
    ]  # fmt: skip
