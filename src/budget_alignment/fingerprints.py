"""Digests that identify inputs: a file's bytes, or a folder's files.

Two kinds for folders: by content (every byte; data files, a translator's weights) and by state (names, inodes, sizes
and modification times, what DVC's own state checks before it rehashes a file; cheap for model weights). A file
rewritten or checked out anew has another state; DVC's cache objects are never rewritten, so two hard links to one
object have one state and one content.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(folder: str | Path, *, contents: bool) -> str:
    """A digest of the files under `folder`: their bytes (`contents`) or their names, inodes, sizes and mtimes."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        if contents:
            digest.update(sha256_file(path).encode())
        else:
            stat = path.stat()
            digest.update(f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


@cache
def source_digest() -> str:
    """A digest of the project's Python code (every module of the package): what a stage computes may follow any."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
