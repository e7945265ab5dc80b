"""The grpo@{init}-{lang} stage on tiny random-init models: params reach TRL unchanged, the policy learns, init=sft
continues the SFT adapter, per-reward curves reach the stage's MLflow run."""

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

from budget_alignment import loading, paths
from budget_alignment.params import Params, PromptParams
from budget_alignment.train import grpo, launch, rewards, sft
from budget_alignment.train import trainer_setup as setup
from test_train_helpers import (
    FAST_GRPO,
    FAST_SFT,
    composed,
    enter_project,
    make_project,
    problems,
    tiny_model,
    tiny_params,
    tiny_tokenizer,
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    return enter_project(tmp_path, monkeypatch)


def config_for(params: Params, tmp_path: Path):
    return grpo.grpo_config(
        params.grpo,
        stage="grpo@sft-ja",
        compute=params.compute,
        seed=params.seed,
        output_dir=tmp_path / "checkpoints",
    )


def test_every_grpo_param_reaches_trl_unchanged(tmp_path):
    # What `dvc exp run -S grpo.clip_high=0.3 ...` writes into params.yaml, composed by Hydra from conf/.
    overrides = [
        "grpo.clip_high=0.3",
        "grpo.clip_low=0.15",
        "grpo.num_iterations=3",
        "grpo.beta=0.04",
        "grpo.num_generations=2",
        "grpo.loss_type=dr_grpo",
        "grpo.scale_rewards=batch",
        "grpo.learning_rate=3e-6",
        "grpo.disable_dropout=true",
        "grpo.lora.r=12",
        "grpo.reward_weights.accuracy=2.0",
        "grpo.reward_weights.language=0.5",
        "grpo.reward_weights.format=0.1",
        "grpo.temperature=0.7",
        "grpo.top_p=0.9",
        "grpo.max_completion_length=33",
        "grpo.mask_truncated_completions=true",
        "grpo.prompts_per_step=9",
        "grpo.per_device_batch_size=7",
        "grpo.max_steps=5",
        "grpo.save_steps=3",
    ]
    params = Params.model_validate(yaml.safe_load(composed(*overrides)))
    config = config_for(params, tmp_path)
    expected = {
        "epsilon_high": 0.3,
        "epsilon": 0.15,
        "num_iterations": 3,
        "beta": 0.04,
        "num_generations": 2,
        "loss_type": "dr_grpo",
        "scale_rewards": "batch",
        "learning_rate": 3e-6,
        "disable_dropout": True,
        "reward_weights": [2.0, 0.5, 0.1],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_completion_length": 33,
        "mask_truncated_completions": True,
        # 9 prompts x 2 rollouts = 18 completions per step on one process: 6 at once (7 would not divide 18) x 3.
        "per_device_train_batch_size": 6,
        "gradient_accumulation_steps": 3,
        "generation_batch_size": 18,
        "max_steps": 5,
        "save_steps": 3,
        "use_vllm": False,
        "seed": params.seed,
        # STACK.md: the CPU flags when there is no GPU, whatever the profile asks for; bf16 where the CPU has it.
        "use_cpu": True,
        "bf16": loading.cpu_computes_bf16(),
        "gradient_checkpointing": False,
    }
    assert {key: getattr(config, key) for key in expected} == expected
    # The reward weights follow the order of the reward functions.
    names = list(params.grpo.reward_weights)
    assert [reward.__name__ for reward in rewards.build_rewards(names, params.scoring)] == names
    assert names == ["accuracy", "language", "format"]
    lora = setup.lora_config(params.grpo.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (12, params.grpo.lora.alpha, params.grpo.lora.dropout)


def test_a_language_may_replace_reward_weights(tmp_path):
    # The post's correctness-first Spanish, as `dvc exp run -S '+grpo.reward_weights.es={...}'` writes it.
    params = Params.model_validate(yaml.safe_load(composed("+grpo.reward_weights.es={accuracy:1.0,language:0.1}")))
    assert params.grpo.reward_names() == ["accuracy", "language", "format"]
    spanish = grpo.grpo_config(params.grpo, stage="grpo@sft-es", compute=params.compute, seed=params.seed,
                               output_dir=tmp_path, lang="es")  # fmt: skip
    assert spanish.reward_weights == [1.0, 0.1, 0.2]
    assert config_for(params, tmp_path).reward_weights == [1.0, 0.2, 0.2]  # every other language


def test_vllm_settings_reach_trl(tmp_path):
    url = "http://gpu-node-7:8000"
    params = tiny_params(grpo={"use_vllm": True, "vllm_mode": "server", "vllm_server_url": url})
    config = config_for(params, tmp_path)
    assert (config.use_vllm, config.vllm_mode, config.vllm_server_base_url) == (True, "server", url)
    assert config.vllm_max_model_length == params.grpo.max_prompt_length + params.grpo.max_completion_length


def varied_length(completions, **_):
    """A reward that varies between the samples of a random model, so the advantages (and the loss) are not zero."""
    return [float(len(completion)) for completion in completions]


def test_a_grpo_step_changes_the_policy(tmp_path):
    tokenizer = tiny_tokenizer()
    params = tiny_params(grpo=FAST_GRPO)
    dataset = grpo.grpo_dataset(problems("math", "ja", 4), tokenizer, PromptParams(), 256)
    config = config_for(params, tmp_path)
    # The real accuracy and language rewards, and one that varies in the place of the format reward.
    reward_functions = [*rewards.build_rewards(["accuracy", "language"], params.scoring), varied_length]
    trainer = grpo.make_grpo_trainer(
        tiny_model(tokenizer), tokenizer, dataset, config, reward_functions, setup.lora_config(params.grpo.lora)
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(entry.get("loss") for entry in trainer.state.log_history)
    changed = [
        name for name, p in trainer.model.named_parameters() if name in before and not torch.equal(before[name], p)
    ]
    assert changed and all("lora_" in name for name in changed)


def test_the_dataset_carries_what_the_rewards_read_and_drops_prompts_too_long():
    tokenizer = tiny_tokenizer()
    items = problems("math", "fr", 3)
    dataset = grpo.grpo_dataset(items, tokenizer, PromptParams(), 10_000)
    row = dataset[0]
    assert row["prompt"].endswith("<|im_start|>assistant\n<think>\n") and items[0].question in row["prompt"]
    assert (row["answer"], row["answer_type"], row["lang"], row["choices"]) == (items[0].answer, "math", "fr", "")
    assert row["domain"] == "math"  # a plain problem: the recipe's math-only GRPO
    lengths = sorted(len(tokenizer(r["prompt"])["input_ids"]) for r in dataset)
    assert len(grpo.grpo_dataset(items, tokenizer, PromptParams(), lengths[1])) == 2
    with pytest.raises(setup.TrainingError, match="max_prompt_length"):
        grpo.grpo_dataset(items, tokenizer, PromptParams(), 3)


def stand_in(name: str, measure):
    """A reward registered under `name` that varies between a random model's completions (the real ones are flat)."""

    def factory(scoring):
        def reward(completions, **_):
            return [float(measure(rewards.completion_text(completion))) for completion in completions]

        reward.__name__ = name
        return reward

    return factory


def trained_adapter(params: Params, init: str, lang: str, monkeypatch) -> tuple[dict, object]:
    """Run the grpo stage; the adapter it wrote and the trainer that wrote it."""
    made = []
    make = grpo.make_grpo_trainer
    monkeypatch.setattr(
        grpo, "make_grpo_trainer", lambda *args, **kwargs: made.append(make(*args, **kwargs)) or made[-1]
    )
    grpo.train_grpo(params, init, lang)
    return load_file(paths.model_dir(grpo.model_name(init, lang)) / "adapter_model.safetensors"), made[0]


@pytest.mark.slow
def test_spanish_weights_change_the_logged_weights_and_the_trained_adapter(project, monkeypatch):
    make_project(project, langs=("es",))
    # Two rewards that vary differently, so that their relative weights change the advantages' direction.
    monkeypatch.setitem(rewards.REWARDS, "accuracy", stand_in("accuracy", len))
    monkeypatch.setitem(rewards.REWARDS, "language", stand_in("language", lambda text: len(set(text))))
    settings = FAST_GRPO | {"prompts_per_step": 2, "per_device_batch_size": 4}
    recipe, recipe_trainer = trained_adapter(tiny_params(grpo=settings), "base", "es", monkeypatch)
    weights = {"accuracy": 1.0, "language": 0.2, "format": 0.2, "es": {"accuracy": 1.0, "language": 0.1}}
    spanish, spanish_trainer = trained_adapter(tiny_params(grpo=settings | {"reward_weights": weights}), "base", "es",
                                               monkeypatch)  # fmt: skip
    assert recipe_trainer.args.reward_weights == [1.0, 0.2, 0.2]
    assert spanish_trainer.args.reward_weights == [1.0, 0.1, 0.2]
    assert recipe.keys() == spanish.keys()
    assert max((recipe[name] - spanish[name]).abs().max().item() for name in recipe) > 1e-4


@pytest.mark.slow
def test_a_medical_mixture_is_judged_by_the_medical_head(project, monkeypatch):
    from budget_alignment.records import write_records
    from budget_alignment.train import grpo_data

    write_records(paths.normalized("medicine_train", "ja"), problems("medicine_train", "ja"))
    weights = {"accuracy": 1.0, "language": 0.2, "format": 0.2, "medical": 0.2}
    shares = {"math": {"weight": 0.0, "domain": "math"}, "medicine_train": {"weight": 1.0, "domain": "medical"}}
    params = tiny_params(grpo=FAST_GRPO | {"datasets": shares, "reward_weights": weights})
    grpo_data.gather_grpo_problems(params, "ja")
    _, trainer = trained_adapter(params, "base", "ja", monkeypatch)
    assert set(trainer.train_dataset["domain"]) == {"medical"} and trainer.args.reward_weights == [1.0, 0.2, 0.2, 0.2]
    logged = [entry["rewards/medical/mean"] for entry in trainer.state.log_history if "rewards/medical/mean" in entry]
    assert logged and all(0.0 <= value <= 1.0 for value in logged)
    metrics = json.loads(paths.training_metrics_file(grpo.stage_name("base", "ja")).read_text())
    assert set(metrics["rewards"]) == {"accuracy", "language", "format", "medical", "total"}


def reference_trainer(params: Params, init: str, tmp_path: Path):
    """The grpo stage's trainer with its KL reference set up as the stage sets it (no training)."""
    from budget_alignment import loading

    policy = grpo.load_policy(params, init, "ja")
    tokenizer = loading.load_model_tokenizer(policy.start, params)
    dataset = grpo.grpo_dataset(problems("math", "ja", 4), tokenizer, PromptParams(), 256)
    reward_functions = rewards.build_rewards(params.grpo.reward_names(), params.scoring)
    trainer = grpo.make_grpo_trainer(
        policy.model, tokenizer, dataset, config_for(params, tmp_path), reward_functions, policy.peft_config
    )
    return trainer, grpo.use_reference(trainer, policy, grpo.reference_dir(params, "ja"), params)


def adapter_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    """An adapter's weights by PEFT's saved names (`...lora_A.weight`)."""
    tag = f".{adapter}."
    return {name.replace(tag, "."): p for name, p in model.named_parameters() if tag in name}


# (init, reference, how TRL gets there, whether a frozen `ref` adapter holds the SFT adapter)
REFERENCES = [
    ("base", "base", "TRL's own reference", False),
    ("base", "sft", "a frozen adapter", True),
    ("sft", "sft", "TRL's own reference", True),
    ("sft", "base", "the LoRA disabled", False),
]


@pytest.fixture(scope="module")
def with_lora_sft(tmp_path_factory):
    """A tiny project with a LoRA SFT model in Japanese (trained once for the module's tests)."""
    root = tmp_path_factory.mktemp("lora_sft")
    with pytest.MonkeyPatch.context() as patch:
        enter_project(root, patch)
        sft.train_sft(tiny_params(sft=FAST_SFT), "ja")
    return root


@pytest.mark.parametrize(("init", "reference", "how", "sft_as_ref"), REFERENCES)
def test_the_kl_reference_is_the_model_params_name(with_lora_sft, monkeypatch, init, reference, how, sft_as_ref):
    monkeypatch.chdir(with_lora_sft)
    params = tiny_params(sft=FAST_SFT, grpo=FAST_GRPO | {"beta": 0.1, "reference": reference})
    trainer, described = reference_trainer(params, init, with_lora_sft / "checkpoints")
    assert described.startswith(how) and trainer.ref_model is None
    model = trainer.model
    assert ("ref" in model.peft_config) is sft_as_ref
    if sft_as_ref:
        saved = load_file(paths.model_dir("sft-ja") / "adapter_model.safetensors")
        ref = adapter_weights(model, "ref")
        assert ref.keys() == saved.keys()
        assert all(torch.equal(ref[name], saved[name]) and not ref[name].requires_grad for name in saved)
    assert all(p.requires_grad for p in adapter_weights(model, "default").values())


def test_a_whole_sft_model_as_reference_is_a_separate_model(project, tmp_path):
    params = tiny_params(sft=FAST_SFT | {"use_lora": False}, grpo=FAST_GRPO | {"beta": 0.1, "reference": "sft"})
    sft.train_sft(params, "ja")
    trainer, described = reference_trainer(params, "base", tmp_path)
    assert described == "a separate reference model" and "ref" not in trainer.model.peft_config
    saved = load_file(paths.model_dir("sft-ja") / "model.safetensors")
    live = trainer.ref_model.state_dict()
    assert all(torch.equal(live[name], tensor) for name, tensor in saved.items() if name in live)
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())


@pytest.mark.slow
def test_with_beta_the_stage_logs_the_kl_toward_its_reference(project):
    params = tiny_params(sft=FAST_SFT, grpo=FAST_GRPO | {"beta": 0.1, "reference": "sft"})
    sft.train_sft(params, "ja")
    metrics = grpo.train_grpo(params, "base", "ja")
    assert metrics["reference"] == "data/models/sft/ja" and metrics["kl"] is not None and metrics["kl"] >= 0
    out = paths.model_dir("grpo_base-ja")
    assert not (out / "ref").exists()  # the frozen reference adapter is not published
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "data/models/base"


def test_tokens_generated_add_up_every_logged_generation():
    history = [
        {"step": 1, "completions/mean_length": 10.0},
        {"step": 3, "completions/mean_length": 20.0},  # a log every 2 steps averages 2 generations
        {"step": 3, "train_loss": 0.1},
    ]
    assert grpo.tokens_generated(history, generation_batch_size=4, num_iterations=1) == 10 * 4 + 20 * 4 * 2


def test_tokens_generated_count_a_batch_once_when_it_serves_several_steps():
    """num_iterations 2: batches sampled at steps 1, 3, 5; steps 2 and 4 log no completions."""
    history = [
        {"step": 1, "completions/mean_length": 10.0},
        {"step": 2, "loss": 0.0},
        {"step": 3, "completions/mean_length": 20.0},
        {"step": 4, "loss": 0.0},
        {"step": 6, "completions/mean_length": 30.0},  # a log every 2 steps from here: the batch of step 5
    ]
    assert grpo.tokens_generated(history, generation_batch_size=4, num_iterations=2) == (10 + 20 + 30) * 4


def test_init_base_puts_a_fresh_lora_on_the_base(project):
    params = tiny_params(grpo=FAST_GRPO | {"lora": {"r": 6, "alpha": 12}})
    policy = grpo.load_policy(params, "base", "ja")
    assert policy.start == policy.parent == paths.base_model_dir() and policy.peft_config.r == 6
    assert not hasattr(policy.model, "peft_config")


def test_init_sft_continues_the_sft_adapter(project):
    params = tiny_params(sft=FAST_SFT, grpo=FAST_GRPO)
    sft.train_sft(params, "ja")
    saved = load_file(paths.model_dir("sft-ja") / "adapter_model.safetensors")

    policy = grpo.load_policy(params, "sft", "ja")
    assert policy.peft_config is None and policy.start == paths.model_dir("sft-ja")
    assert policy.parent == paths.base_model_dir()  # the trained adapter still applies to the base
    trainable = {name: p for name, p in policy.model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(saved)
    for name, tensor in saved.items():  # PEFT stores `...lora_A.weight`, the live model `...lora_A.default.weight`
        live = trainable[name.replace(".weight", ".default.weight")]
        torch.testing.assert_close(live, tensor, rtol=0, atol=0)
    assert any(torch.count_nonzero(t) for name, t in saved.items() if "lora_B" in name)


@pytest.mark.slow
def test_the_grpo_stage_logs_each_reward_to_its_mlflow_run(project):
    import mlflow

    params = tiny_params(grpo=FAST_GRPO | {"max_steps": 2}, tracking={"enabled": True, "experiment": "grpo-test"})
    stage = grpo.stage_name("base", "ja")
    outputs = [paths.model_dir("grpo_base-ja"), paths.training_metrics_file(stage)]
    launch.run_stage(
        stage,
        params,
        grpo.SECTIONS,
        [],
        outputs,
        lambda run: grpo.train_grpo(params, "base", "ja", run),
        batch_key=grpo.BATCH_KEY,
    )

    out = paths.model_dir("grpo_base-ja")
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))
    metrics = json.loads(paths.training_metrics_file(stage).read_text())
    assert metrics["global_step"] == 2 and metrics["prompts"] == 6
    assert metrics["tokens_generated"] == 2 * 2 * 12  # 2 steps x 2 completions x 12 tokens (never ending early)
    assert set(metrics["rewards"]) == {"accuracy", "language", "format", "total"}
    budget = json.loads(paths.budget_file(stage).read_text())
    assert budget["tokens_generated"] == metrics["tokens_generated"] and budget["peak_rss_bytes"] > 0

    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(experiment_names=["grpo-test"], output_format="list")
    assert run.info.run_name == stage and run.info.status == "FINISHED"
    assert run.data.params["grpo.clip_high"] == str(params.grpo.clip_high)
    for name in ("accuracy", "language", "format"):
        history = client.get_metric_history(run.info.run_id, f"rewards/{name}/mean")
        assert [point.step for point in history] == [1, 2]
    assert run.data.metrics["budget.tokens_generated"] == metrics["tokens_generated"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_training_uses_bf16_and_the_profiles_checkpointing(tmp_path):
    params = tiny_params(compute={"device": "cuda"}, grpo={"gradient_checkpointing": True})
    config = config_for(params, tmp_path)
    assert config.use_cpu is False and config.bf16 == torch.cuda.is_bf16_supported()
    assert config.gradient_checkpointing is True


def vllm_available() -> bool:
    from trl.import_utils import is_vllm_available

    return is_vllm_available() and torch.cuda.is_available()


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="needs vllm and a CUDA GPU")
def test_a_grpo_step_with_vllm_colocated(project):
    params = tiny_params(
        compute={"device": "cuda"},
        grpo=FAST_GRPO | {"use_vllm": True, "vllm_mode": "colocate"},
    )
    metrics = grpo.train_grpo(params, "base", "ja")
    assert metrics["global_step"] == 1 and metrics["tokens_generated"] > 0


def test_a_training_process_leaves_mlflow_to_its_run():
    """A training stage logs through its run's own process; the trainers' process does not import mlflow (TRL would,
    at import time, were transformers' MLflow integration on: seconds of every training stage's start-up)."""
    env = {key: value for key, value in os.environ.items() if key != "DISABLE_MLFLOW_INTEGRATION"}
    code = (
        "import sys\n"
        "from budget_alignment.train import grpo, sft\n"
        "from trl import GRPOTrainer, SFTTrainer\n"
        "print('mlflow' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr
