"""`budget-align` run as a user runs it, in a process of its own, for the tests of faults (data and model stages).

A disk that fills up needs no `mount`: the process gets a file size limit (RLIMIT_FSIZE), from its start or set while
it runs (`fill_disk`, through prlimit), and its writes then fail with EFBIG as they fail with ENOSPC on a full disk.
Importable by tests: `from stage_process import budget_align, one_error_line`.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def environment(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a stage run in the project `root`: its own cache and MLflow store, no key of the caller's,
    its threads as the environment gives them (the worker's share of the cores, tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "DVC_ROOT", "DVC_STAGE")}
    return {
        **env,
        "PYTHONPATH": str(REPO / "src"),
        "BUDGET_ALIGNMENT_CACHE": str(root / ".cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        **extra,
    }


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "budget_alignment.cli", *args]


def budget_align(root: Path, *args: str, file_size_limit: int | None = None, **env: str):
    """Run `budget-align ARGS` in `root` to its end (with a file size limit from its start, if given)."""

    def limit() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        command(*args),
        cwd=root,
        env=environment(root, **env),
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=600,
    )


def start(root: Path, *args: str, **env: str) -> subprocess.Popen:
    """`budget-align ARGS` started in `root`, its stderr (the log) captured."""
    return subprocess.Popen(
        command(*args), cwd=root, env=environment(root, **env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def fill_disk(process: subprocess.Popen, size: int) -> None:
    """From now on, no file of `process` may grow past `size` bytes: its disk is full."""
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (size, size))


def one_error_line(result) -> str:
    """The command failed with exactly one `error:` line and no traceback; that line."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]
