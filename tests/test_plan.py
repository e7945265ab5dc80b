"""`budget-align plan`: a run's tokens, disk and time before it starts, exact where data and tokenizer are at hand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from budget_alignment import plan
from budget_alignment.train import grpo, sft
from test_train_helpers import FAST_GRPO, FAST_SFT, REPO, composed, enter_project, tiny_params


@pytest.fixture
def project(tmp_path, monkeypatch):
    return enter_project(tmp_path, monkeypatch)


def test_planned_training_tokens_are_the_tokens_the_trainer_sees(project):
    """Whole epochs over the data the stage will read, tokenized as the SFT stage builds its examples."""
    settings = FAST_SFT | {"max_steps": -1, "num_train_epochs": 1, "batch_size": 2, "per_device_batch_size": 2}
    params = tiny_params(sft=settings)
    (cost,) = [c for c in plan.plan_stages(params) if c.stage == "sft@ja"]
    assert not cost.estimated and cost.work.startswith("3 steps of 2 examples")
    metrics = sft.train_sft(params, "ja")
    assert cost.train_tokens == metrics["tokens_trained"] > 0


@pytest.mark.parametrize("max_steps", [2, 4])
def test_planned_tokens_are_exact_when_max_steps_cuts_an_epoch(project, max_steps):
    """6 chains, 2 a step: 2 steps read 4 of them, 4 steps an epoch and 2 more; which ones, the trainer's seeded
    shuffle decides, and the plan replays it (the chains differ in length, so a wrong guess shows)."""
    settings = FAST_SFT | {"max_steps": max_steps, "batch_size": 2, "per_device_batch_size": 1}
    params = tiny_params(sft=settings)
    (cost,) = [c for c in plan.plan_stages(params) if c.stage == "sft@ja"]
    tokenizer, max_length = plan._tokenizer(params), params.sft.max_length_for("ja")
    texts = plan.training_texts(params, params.sft.dataset, "ja", tokenizer, max_length)
    assert len(set(texts.tokens)) > 1 and texts.records == 6
    metrics = sft.train_sft(params, "ja")
    assert metrics["global_step"] == max_steps
    assert not cost.estimated and cost.train_tokens == metrics["tokens_trained"]


@pytest.mark.slow
def test_planned_rollout_tokens_are_the_tokens_grpo_samples_when_a_batch_serves_two_steps(project):
    """num_iterations 2 over 3 steps: rollouts sampled at steps 1 and 3 only (the tiny model never stops early), for
    the prompts TRL's seeded sampler draws (the plan replays it; prompts differ in length, so a wrong draw shows)."""
    params = tiny_params(grpo=FAST_GRPO | {"max_steps": 3, "num_iterations": 2})
    (cost,) = [c for c in plan.plan_stages(params) if c.stage == "grpo@base-ja"]
    texts = plan.grpo_prompt_texts(params, "ja", plan._tokenizer(params))
    assert not texts.estimated and len(set(texts.tokens)) > 1
    metrics = grpo.train_grpo(params, "base", "ja")
    assert metrics["global_step"] == 3
    assert cost.generated_tokens == metrics["tokens_generated"] == 2 * 2 * 12  # 2 batches x 2 rollouts x 12 tokens
    assert cost.train_tokens == metrics["tokens_trained"]


def test_without_the_tokenizer_the_tokens_are_estimated_and_say_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no base model yet: before the first stage of a run
    costs = {c.stage: c for c in plan.plan_stages(tiny_params())}
    assert costs["sft@ja"].estimated and costs["sft@ja"].train_tokens > 0
    evaluation = tiny_params().evaluation
    problems = evaluation.limit * len(evaluation.datasets) * len(tiny_params().languages)
    assert costs["generate@sft"].generated_tokens == problems * evaluation.n * evaluation.max_new_tokens
    assert costs["generate@base"].generated_tokens == costs["generate@sft"].generated_tokens * 4 // 3  # and English


def test_a_run_the_disk_cannot_hold_stops_before_any_work(tmp_path):
    result = plan.make_plan(tiny_params(), tmp_path)
    assert result.link_type == "copy" and result.cache_bytes == sum(c.output_bytes for c in result.stages)
    plan.check_disk(result, tmp_path)  # a tiny run fits
    result.free_bytes = result.disk_bytes - 1
    with pytest.raises(plan.PlanError, match=r"needs about .* GiB .* has .* GiB free"):
        plan.check_disk(result, tmp_path)


def test_the_repository_links_its_cache_so_outputs_are_stored_once():
    assert plan.link_type(REPO) in ("hardlink", "symlink", "reflink")


def test_the_paper_plan_counts_device_hours_on_the_machine_it_assumes(tmp_path):
    import yaml

    from budget_alignment.params import Params

    params = Params.model_validate(yaml.safe_load(composed("profile=paper")))
    result = plan.make_plan(params, tmp_path)
    costs = {c.stage: c for c in result.stages}
    # Full-parameter SFT: a whole model out, its weights and Adam's moments in each of two checkpoints.
    parameters = params.plan.model.parameters
    assert costs["sft@ja"].output_bytes == parameters * 2
    assert costs["sft@ja"].checkpoint_bytes == 2 * (parameters * 2 + parameters * plan.OPTIMIZER_BYTES_PER_PARAMETER)
    assert costs["grpo@sft-ja"].generated_tokens == 500 * 24 * params.grpo.max_completion_length
    assert costs["sft@ja"].devices == params.plan.throughput.devices == 8
    assert result.seconds > 0 and "assumed" in result.throughput_source
    # Each kind of stage at its own rate: GRPO's rollouts at the in-trainer rate, not the generate stages' one.
    speed = params.plan.throughput
    grpo = costs["grpo@sft-ja"]
    trained = grpo.train_tokens * params.grpo.num_iterations
    work = trained / speed.train_tokens_per_s + grpo.generated_tokens / speed.rollout_tokens_per_s
    assert grpo.seconds == pytest.approx(speed.stage_start_s + work / 8)
    assert speed.rollout_tokens_per_s != speed.generate_tokens_per_s


def test_the_command_prints_the_table_for_a_composed_profile():
    result = subprocess.run(
        [sys.executable, "-m", "budget_alignment.cli", "plan", "profile=paper_cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| grpo@sft-ja |" in result.stdout and "Disk at most:" in result.stdout


def test_a_global_batch_the_machine_s_devices_cannot_share_fails_the_plan_naming_both_numbers(tmp_path):
    """`auto` processes: one per device of the machine `plan.throughput` describes (params cannot check it alone)."""
    machine = {"plan.throughput": {"devices": 2}}
    params = tiny_params(compute={"num_processes": "auto"}, sft={"batch_size": 3}, **machine)
    with pytest.raises(plan.PlanError, match=r"sft.batch_size: 3 per step cannot be split evenly over 2 processes"):
        plan.make_plan(params, tmp_path)
