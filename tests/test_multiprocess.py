"""`budget-align sft` with compute.num_processes=2 re-launches itself under `accelerate launch` (gloo on the CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from budget_alignment import loading, paths, plan
from budget_alignment.train import launch, sft, trainer_setup
from test_train_helpers import (
    FAST_SFT,
    REPO,
    enter_project,
    subprocess_env,
    tiny_params,
    worker_threads,
    write_params,
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    return enter_project(tmp_path, monkeypatch)


@pytest.mark.slow
def test_two_processes_train_the_same_recipe_as_one(project):
    """2 processes (gloo on the CPU) take the same global batch, the same optimizer steps and the same examples as 1
    process; 2 steps cut the epoch, and the plan names the examples they read on either count."""
    sft_settings = FAST_SFT | {"max_steps": 2, "batch_size": 2, "per_device_batch_size": 2}
    # float32: bf16's rounding differs with the batch's split (padding), and Adam's first steps turn any difference
    # in a near-zero gradient into a whole step (the paper_cpu e2e trains on 2 processes in the default precision).
    one = tiny_params(compute={"num_processes": 1, "torch_threads": 1, "mixed_precision": "no"}, sft=sft_settings)
    reference = sft.train_sft(one, "ja")
    one_process = loading.load_model(paths.model_dir("sft-ja"), one)
    shutil.rmtree(paths.model_dir("sft-ja"))

    two = tiny_params(compute={"num_processes": 2, "torch_threads": 1, "mixed_precision": "no"}, sft=sft_settings)
    (project / "conf/accelerate").mkdir(parents=True)
    (project / "conf/accelerate/ddp.yaml").write_text((REPO / "conf/accelerate/ddp.yaml").read_text())
    params_file = write_params(project / "params.yaml", two)
    result = subprocess.run(
        [sys.executable, "-m", "budget_alignment.cli", "-v", "sft", "ja", "--params", str(params_file)],
        cwd=project,
        env=subprocess_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "launching 2 processes" in result.stderr and "--config_file conf/accelerate/ddp.yaml" in result.stderr
    assert "training on 2 processes (MULTI_CPU)" in result.stderr

    metrics = json.loads(paths.training_metrics_file("sft@ja").read_text())
    # 6 chains, 2 per optimizer step, 2 steps either way (1 per device and step on 2 processes, 2 on one).
    assert metrics["global_step"] == reference["global_step"] == 2
    assert metrics["global_batch_size"] == reference["global_batch_size"] == 2
    # The same 4 of the 6 chains, on either count, and the ones the plan replays for each process count.
    planned = [next(c for c in plan.plan_stages(run) if c.stage == "sft@ja").train_tokens for run in (one, two)]
    assert metrics["tokens_trained"] == reference["tokens_trained"] == planned[0] == planned[1]
    # What the ranks saved is one loadable adapter, trained as the one process trained it.
    two_processes = loading.load_model(paths.model_dir("sft-ja"), two)
    trained = {n: p for n, p in two_processes.named_parameters() if "lora_B" in n}
    assert trained and any(torch.count_nonzero(p) for p in trained.values())
    reference_weights = dict(one_process.named_parameters())
    for name, weights in trained.items():
        difference = (weights - reference_weights[name]).abs().max()
        assert difference <= 0.05 * weights.abs().max(), (name, difference)
    # The launching process tracked the stage and took the ranks' figures into its budget.
    budget = json.loads(paths.budget_file("sft@ja").read_text())
    assert budget["tokens_trained"] == metrics["tokens_trained"]
    assert not list(paths.models_dir().glob(".*"))  # no staging or temporary folders left behind


def test_a_global_batch_the_processes_cannot_share_stops_the_stage_before_any_work(project):
    data = tiny_params(sft=FAST_SFT).model_dump(mode="json")
    data["compute"]["num_processes"], data["sft"]["batch_size"] = 2, 3
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "budget_alignment.cli", "sft", "ja", "--params", str(params_file)],
        cwd=project,
        env=subprocess_env(project),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "sft.batch_size: 3 per step cannot be split evenly over 2 processes" in result.stderr
    assert "Traceback" not in result.stderr and not paths.model_dir("sft-ja").exists()


@pytest.mark.parametrize(
    ("name", "distributed_type"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero3", "DEEPSPEED")]
)
def test_the_shipped_accelerate_configs_load_and_ask_for_whole_model_saves(name, distributed_type):
    # Running FSDP and ZeRO-3 needs GPUs; here only the settings that make `save_model` write one model are checked.
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


def test_auto_picks_data_parallel_for_lora_and_the_cpu_and_sharding_for_a_full_fine_tune_on_gpus(monkeypatch):
    import torch

    auto = tiny_params(compute={"device": "auto", "num_processes": "auto", "accelerate_config": "auto"}).compute
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.process_count(auto) == 1
    assert launch.accelerate_config(auto, full_finetune=True) == "conf/accelerate/ddp.yaml"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert launch.process_count(auto) == 8
    assert launch.accelerate_config(auto, full_finetune=False) == "conf/accelerate/ddp.yaml"
    assert launch.accelerate_config(auto, full_finetune=True) == "conf/accelerate/fsdp.yaml"
    zero3 = auto.model_copy(update={"sharding": "zero3"})
    assert launch.accelerate_config(zero3, full_finetune=True) == "conf/accelerate/zero3.yaml"


@pytest.mark.parametrize(
    ("global_size", "max_per_device", "processes", "plan"),
    [(24, 8, 1, (8, 3)), (24, 8, 8, (3, 1)), (24, 8, 2, (6, 2)), (16, 1, 8, (1, 2)), (18, 7, 1, (6, 3))],
)
def test_a_global_batch_is_split_into_per_device_batches_and_accumulation(
    global_size, max_per_device, processes, plan
):
    split = trainer_setup.batch_plan(global_size, max_per_device, processes, "grpo.prompts_per_step")
    assert (split.per_device, split.accumulation) == plan and split.global_size == global_size


def test_a_process_the_suite_starts_has_its_workers_share_of_the_cores():
    """Under `pytest -n N` each worker, and every process it starts that sets no threads of its own, runs torch on the
    cores over N (tests/conftest.py): two workers of two threads each on two cores would train several times slower."""
    probe = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    threads = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    assert threads == str(worker_threads())
    assert tiny_params().compute.torch_threads == worker_threads()
