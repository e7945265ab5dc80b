"""The sft@{lang} stage on tiny random-init models: config, completion-only loss, learning, outputs, crash-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from budget_alignment import loading, paths
from budget_alignment.params import ComputeParams, PromptParams, SftParams
from budget_alignment.prompts import without_duplicate_bos
from budget_alignment.train import checkpoints as setup
from budget_alignment.train import sft, trainer_setup
from test_train_helpers import (
    FAST_SFT,
    complete_checkpoints,
    enter_project,
    problems,
    subprocess_env,
    tiny_model,
    tiny_params,
    tiny_tokenizer,
    wait_for,
    write_params,
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    return enter_project(tmp_path, monkeypatch)


def config_for(training: SftParams, tmp_path: Path, lang: str = "ja", **changes):
    changes = {"compute": ComputeParams(device="cpu")} | changes
    return sft.sft_config(
        training,
        stage=f"sft@{lang}",
        max_length=training.max_length_for(lang),
        seed=7,
        output_dir=tmp_path / "checkpoints",
        **changes,
    )


def test_sft_config_carries_the_params_and_the_cpu_flags(tmp_path):
    training = SftParams(
        learning_rate=3e-4,
        num_train_epochs=2,
        max_steps=9,
        batch_size=12,
        per_device_batch_size=3,
        max_length={"default": 320, "ja": 448},
        warmup_ratio=0.1,
        lr_scheduler_type="linear",
        save_steps=5,
        logging_steps=2,
        gradient_checkpointing=True,
    )
    config = config_for(training, tmp_path)
    assert (config.learning_rate, config.num_train_epochs, config.max_steps) == (3e-4, 2, 9)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (3, 4)
    assert (config.warmup_steps, config.lr_scheduler_type) == (0.1, "linear")
    assert (config.save_steps, config.logging_steps, config.save_strategy) == (5, 2, "steps")
    assert config.seed == config.data_seed == 7
    assert config.output_dir == str(tmp_path / "checkpoints") and config.run_name == "sft@ja"
    # Japanese is about twice as long in tokens: each language has its own max_length.
    assert config.max_length == 448 and config_for(training, tmp_path, "fr").max_length == 320
    assert config.completion_only_loss is True and config.packing is False
    # STACK.md: gradient checkpointing on the CPU is several times slower; bf16 as compute.mixed_precision says.
    assert config.use_cpu is True and config.gradient_checkpointing is False
    assert config.bf16 is loading.cpu_computes_bf16()  # `auto`
    for precision, bf16 in [("no", False), ("bf16", True)]:
        compute = ComputeParams(device="cpu", mixed_precision=precision)
        assert config_for(training, tmp_path, compute=compute).bf16 is bf16
    assert config.report_to == [] or config.report_to == "none"


@pytest.mark.parametrize(
    ("cpuinfo", "computes_bf16"),
    [
        # An AMD EPYC (Zen 4) and an Intel Sapphire Rapids compute bf16; a Skylake Xeon has AVX-512 without it.
        ("flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n", True),
        ("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n", True),
        ("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n", False),
        ("Features\t: fp asimd bf16 i8mm\n", True),  # Arm (Graviton 3)
        ("Features\t: fp asimd\n", False),
        (None, False),  # no /proc/cpuinfo: not Linux
    ],
)
def test_auto_mixed_precision_is_bf16_where_the_cpu_computes_it(tmp_path, cpuinfo, computes_bf16):
    file = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        file.write_text("processor\t: 0\n" + cpuinfo)
    assert loading.cpu_computes_bf16(file) is computes_bf16
    for precision, expected in [("auto", loading.cpu_computes_bf16()), ("bf16", True), ("no", False)]:
        assert loading.bf16_mixed_precision(ComputeParams(device="cpu", mixed_precision=precision)) is expected


def fast_trainer(tmp_path, examples=None, use_lora=True):
    tokenizer = tiny_tokenizer()
    training = SftParams(**(FAST_SFT | {"use_lora": use_lora}))
    examples = examples or sft.sft_examples(problems("chains", "ja", 4), tokenizer, PromptParams())
    model = tiny_model(tokenizer)
    trainer = sft.make_sft_trainer(model, tokenizer, examples, config_for(training, tmp_path), training)
    return trainer, tokenizer, examples


def test_the_loss_covers_the_completion_only(tmp_path):
    trainer, tokenizer, examples = fast_trainer(tmp_path)
    row = trainer.train_dataset[0]
    prompt_ids = tokenizer(examples[0]["prompt"])["input_ids"]
    labels = row["labels"]
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    trained = tokenizer.decode([t for t in labels if t != -100])
    assert trained == examples[0]["completion"]  # reasoning, </think>, answer and the end-of-turn token
    assert "</think>" in trained and trained.endswith("<|im_end|>")


def test_an_sft_step_changes_the_lora_weights_and_only_them(tmp_path):
    trainer, _, _ = fast_trainer(tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)  # B starts at zero: the adapter now does something


def test_full_fine_tuning_changes_the_model_weights(tmp_path):
    trainer, _, _ = fast_trainer(tmp_path, use_lora=False)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and not any("lora" in n for n in changed)


def test_examples_longer_than_max_length_are_counted():
    tokenizer = tiny_tokenizer()
    examples = sft.sft_examples(problems("chains", "ja", 3), tokenizer, PromptParams())
    lengths = [len(tokenizer(e["prompt"] + e["completion"])["input_ids"]) for e in examples]
    assert sft.count_truncated(examples, tokenizer, max(lengths)) == 0
    assert sft.count_truncated(examples, tokenizer, min(lengths)) == sum(n > min(lengths) for n in lengths)


def test_the_sft_stage_writes_a_loadable_adapter_and_its_metrics(project):
    params = tiny_params(sft=FAST_SFT)
    metrics = sft.train_sft(params, "ja")

    out = paths.model_dir("sft-ja")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")) and not (out / "README.md").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(paths.base_model_dir()) and config["r"] == 4
    model = loading.load_model(out, params)
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)

    written = json.loads(paths.training_metrics_file("sft@ja").read_text())
    assert written == {"stage": "sft@ja", **metrics}
    assert metrics["global_step"] == 2 and metrics["examples"] == 6 and metrics["tokens_trained"] > 0
    assert "resumed_from_step" not in metrics and metrics["truncated_examples"] == 0
    assert not paths.checkpoints_dir("sft@ja").exists()


def test_missing_data_is_a_clear_error(project):
    paths.normalized("chains", "ja").unlink()
    with pytest.raises(
        trainer_setup.TrainingError, match=r"chains/ja.jsonl does not exist \(run the data stages first\)"
    ):
        sft.train_sft(tiny_params(sft=FAST_SFT), "ja")


@pytest.mark.slow
def test_a_killed_sft_stage_resumes_from_its_last_checkpoint(project):
    steps = 40
    params = tiny_params(sft=FAST_SFT | {"max_steps": steps, "save_steps": 4})
    params_file = write_params(project / "params.yaml", params)
    command = [sys.executable, "-m", "budget_alignment.cli", "sft", "ja", "--params", str(params_file)]
    root = paths.checkpoints_dir("sft@ja")

    first = subprocess.Popen(command, cwd=project, env=subprocess_env(project), stderr=subprocess.DEVNULL)
    wait_for(lambda: complete_checkpoints(root), first, timeout=120)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert not paths.model_dir("sft-ja").exists()
    last = setup.last_complete_checkpoint(complete_checkpoints(root)[-1].parent)
    assert last is not None and setup.checkpoint_step(last) < steps

    second = subprocess.run(command, cwd=project, env=subprocess_env(project), capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {last}" in second.stderr
    metrics = json.loads(paths.training_metrics_file("sft@ja").read_text())
    budget = json.loads(paths.budget_file("sft@ja").read_text())
    assert budget["resumed_from_step"] == setup.checkpoint_step(last)
    assert metrics["global_step"] == steps and "resumed_from_step" not in metrics
    assert (paths.model_dir("sft-ja") / "adapter_model.safetensors").is_file()
    assert load_file(paths.model_dir("sft-ja") / "adapter_model.safetensors")
    assert not root.exists()
    assert budget["tokens_trained"] == metrics["tokens_trained"] > 0


def test_a_checkpoint_whose_state_file_was_cut_short_is_removed_and_the_one_before_resumed(tmp_path):
    """A kill while the Trainer writes its state file, the last of a checkpoint, leaves it empty or cut short (seen in
    CI: the rerun stopped on its JSON). Such a checkpoint is not complete; the one before it is resumed."""
    state = json.dumps({"global_step": 1, "log_history": []}, indent=2)
    for step, text in [(1, state), (2, ""), (3, state[: len(state) // 2]), (4, None)]:
        checkpoint = tmp_path / f"{setup.CHECKPOINT_PREFIX}{step}"
        checkpoint.mkdir()
        (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
        if text is not None:
            (checkpoint / setup.CHECKPOINT_COMPLETE_MARKER).write_text(text)

    assert setup.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_a_bos_written_by_the_chat_template_is_not_doubled_by_the_tokenizer():
    """R1-Distill's template writes `{{bos_token}}` and its tokenizer adds BOS itself: keep one."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    bos = "<｜begin▁of▁sentence｜>"
    backend = Tokenizer(WordLevel({"<unk>": 0, bos: 1, "<｜end▁of▁sentence｜>": 2}, unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<｜end▁of▁sentence｜>")
    tokenizer.chat_template = (Path(__file__).parent / "fixtures/deepseek_r1_distill_chat_template.jinja").read_text()

    (example,) = sft.sft_examples(problems("chains", "en", 1), tokenizer, PromptParams())
    assert example["prompt"].startswith("<｜User｜>")
    assert tokenizer(example["prompt"])["input_ids"].count(1) == 1
    # A tokenizer that does not add BOS keeps the template's.
    assert without_duplicate_bos(tiny_tokenizer(), "<|im_start|>user") == "<|im_start|>user"
