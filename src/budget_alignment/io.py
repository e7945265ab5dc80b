"""Crash-safe file writing: an output is either the old one, the complete new one, or absent."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


# A write that fails for lack of space or permission: the stage ends with one line, finished work kept.
WRITE_FAILURES = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)


class OutputError(OSError):
    """An output could not be written (full disk, read-only or unwritable path)."""


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
        if isinstance(error, OSError) and error.errno in (
            errno.ENOSPC,
            errno.EFBIG,
            errno.EROFS,
            errno.EACCES,
            errno.EDQUOT,
        ):
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
