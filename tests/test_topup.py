"""The topup@{lang} stage: switched off (the default) it writes a marker whose bytes never change and GRPO-from-SFT
starts from the SFT model as in the recipe; switched on it continues the SFT adapter on the top-up set and
GRPO-from-SFT starts from the top-up."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from budget_alignment import loading, paths
from budget_alignment.cli import app
from budget_alignment.params import Params
from budget_alignment.records import write_records
from budget_alignment.train import grpo, outputs, sft, topup
from budget_alignment.train import trainer_setup as setup
from test_train_helpers import FAST_GRPO, FAST_SFT, FAST_TOPUP, composed, enter_project, problems, tiny_params


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = enter_project(tmp_path, monkeypatch)
    write_records(paths.normalized("topup_math", "ja"), problems("topup_math", "ja"))
    return root


def folder_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_switched_off_the_output_is_a_constant_marker_and_grpo_starts_from_sft(project):
    out = paths.model_dir("topup-ja")
    topup.switch_off("ja")
    first = folder_bytes(out)
    assert list(first) == [outputs.SWITCHED_OFF] and outputs.switched_off(out)
    sft.train_sft(tiny_params(sft=FAST_SFT), "ja")  # whatever the SFT model: the marker is the same bytes
    topup.switch_off("ja")
    assert folder_bytes(out) == first
    metrics = json.loads(paths.training_metrics_file("topup@ja").read_text())
    assert metrics == {"stage": "topup@ja", "topped_up": False}
    assert grpo.topup_start("ja") is None
    assert grpo.load_policy(tiny_params(grpo=FAST_GRPO), "sft", "ja").start == paths.model_dir("sft-ja")


def test_grpo_from_sft_needs_the_topup_stage_output(project):
    sft.train_sft(tiny_params(sft=FAST_SFT), "ja")
    for entry in paths.model_dir("topup-ja").iterdir():
        entry.unlink()
    with pytest.raises(setup.TrainingError, match=r"topup@ja output"):
        grpo.load_policy(tiny_params(grpo=FAST_GRPO), "sft", "ja")


@pytest.mark.slow
def test_switched_on_it_continues_the_sft_adapter_and_grpo_from_sft_starts_from_it(project):
    params = tiny_params(sft=FAST_SFT, topup=FAST_TOPUP | {"languages": ["ja"]}, grpo=FAST_GRPO)
    sft.train_sft(params, "ja")
    metrics = topup.train_topup(params, "ja")
    assert metrics["topped_up"] and metrics["start"] == "data/models/sft/ja" and metrics["global_step"] == 1
    out = paths.model_dir("topup-ja")
    assert loading.is_adapter(out) and not outputs.switched_off(out)
    assert loading.adapter_parent(out) == paths.base_model_dir()  # the SFT adapter continued: still on the base
    before = load_file(paths.model_dir("sft-ja") / "adapter_model.safetensors")
    after = load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    policy = grpo.load_policy(params, "sft", "ja")
    assert policy.start == out and policy.parent == paths.base_model_dir() and policy.peft_config is None
    trained = grpo.train_grpo(params, "sft", "ja")
    assert trained["topup"] == "data/models/topup/ja"
    grpo_out = paths.model_dir("grpo_sft-ja")
    assert json.loads((grpo_out / "adapter_config.json").read_text())["base_model_name_or_path"] == "data/models/base"


def test_the_cli_runs_the_topup_of_a_language_not_topped_up(project, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    raw = yaml.safe_load(composed())
    raw["tracking"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    result = CliRunner().invoke(app, ["topup", "ja"])
    assert result.exit_code == 0, result.output
    assert outputs.switched_off(paths.model_dir("topup-ja"))


def test_topup_languages_are_languages_of_the_run():
    raw = yaml.safe_load(composed())
    raw["topup"]["languages"] = ["de"]
    with pytest.raises(ValueError, match=r"topup\.languages: 'de' is not in languages"):
        Params.model_validate(raw)
