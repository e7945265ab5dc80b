"""Crash-safe file writing: an output is either the old one, the complete new one, or absent; and one shape for a
write that fails (`OutputError`), whichever library made it.

A full disk reaches the project in several shapes: Python's own writes raise `OSError` (ENOSPC, or EFBIG under a file
size limit), safetensors raises `SafetensorError` with "(os error 28)" in its message, torch.save a `RuntimeError`
that has lost the errno ("iostream error"), sqlite an `OperationalError`. `writing(path)` turns every one of them into
an `OutputError` naming the path and the cause, which the CLI prints as one line; stages wrap their large writes
(checkpoints, model folders, work files) in it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)

# A write that fails for lack of space or permission, wherever it happens (an output, a checkpoint, a cache).
WRITE_FAILURES = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)
# Rust's I/O errors (safetensors) end with the OS error number.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch.save's C++ writer reports a failed write without its errno.
_TORCH_WRITE_FAILED = re.compile(r"iostream error|unexpected pos \d+|PytorchStreamWriter failed|file write failed")
# Less free space than this after a write failed: the disk is full (a model shard is far larger).
_NEARLY_FULL_BYTES = 64 << 20


class OutputError(OSError):
    """An output could not be written (full disk, read-only or unwritable path); its message names the path."""


def write_failure(error: BaseException, path: str | Path | None = None) -> OutputError | None:
    """`error` as an OutputError if it is a failed write, else None. The message names the file the OS named, else
    `path`; with neither, the cause alone (`File too large`)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:  # the exception and what it was raised from
        seen.add(id(cause))
        if isinstance(cause, OutputError):
            return cause
        code, name = None, path
        if isinstance(cause, OSError) and cause.errno in WRITE_FAILURES:
            code, name = cause.errno, cause.filename or path
        elif (code := _errno_in_message(cause, path)) is None:
            cause = cause.__cause__ or cause.__context__
            continue
        reason = os.strerror(code)
        return OutputError(code, f"cannot write {name}: {reason}" if name is not None else reason)
    return None


def _errno_in_message(error: BaseException, path: str | Path | None) -> int | None:
    message = str(error)
    match = _RUST_OS_ERROR.search(message)
    if match and int(match[1]) in WRITE_FAILURES:
        return int(match[1])
    if isinstance(error, RuntimeError) and _TORCH_WRITE_FAILED.search(message):
        return _diagnose(Path(path if path is not None else "."))
    return None


def _diagnose(path: Path) -> int | None:
    """Why a write under `path` failed, when the library lost the errno: a file size limit, a full disk, a folder
    this process may not write; None if none of them holds (then it is not a space or permission problem)."""
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES:
        return errno.ENOSPC
    if not os.access(folder if folder.is_dir() else folder.parent, os.W_OK):
        return errno.EACCES
    return None


@contextmanager
def writing(path: str | Path | Callable[[], str | Path]) -> Iterator[None]:
    """Run writes of `path` (or of the path `path()` names when they fail): a failure for lack of space or permission,
    whatever library raised it, becomes one `OutputError` naming the path and the cause; other errors pass."""
    try:
        yield
    except Exception as error:
        failure = write_failure(error, path() if callable(path) else path)
        if failure is None or failure is error:
            raise
        raise failure from error


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path.parent.glob(f".{path.name}.*.tmp"))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
    except OSError as error:
        raise OutputError(error.errno, f"cannot write {path}: {error.strerror}") from error
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, OutputError) and error.errno in WRITE_FAILURES:
            raise OutputError(error.errno, f"cannot write {path}: {error.strerror}") from error
        raise


def write_json(path: str | Path, data: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, sort_keys=True)
        handle.write("\n")


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Build a folder beside `out`, then swap it in: `out` is the old folder, the new one, or absent."""
    remove_leftovers([*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")])
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
    except OSError as error:
        raise OutputError(error.errno, f"cannot write {out}: {error.strerror}") from error
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(paths: Iterable[Path]) -> None:
    """Remove what a killed writer left beside its output (a half-written file or folder): one output, one writer."""
    for leftover in paths:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
