"""The translation cache: content-addressed machine translations of protected chunks, in sqlite.

A key is the sha256 of the chunk, the backend, the model, the prompt version and the target language; a retried
chunk's reply (another temperature, another seed) is stored under a key that also names the attempt, so a run
resumed after a crash makes the same choice as the run that crashed. Every reply is committed as it comes, valid or
not: which attempt wins is decided by reading the cache, never by asking again.

The cache is reusable work, not a pipeline output: it lives under `.cache/` (`paths.translation_cache()`), keeps a
timestamp per entry, and several stages may share it. A write that fails (a full disk, a read-only folder) ends the
stage with an `OutputError` naming the cache file; the entries committed before it stay.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from budget_alignment import paths
from budget_alignment.io import OutputError


def cache_key(text: str, backend: str, model: str, prompt_version: str, lang: str, variant: str = "") -> str:
    """The key of one chunk's translation; `variant` names a retry (empty for the first attempt)."""
    parts = [text, backend, model, prompt_version, lang]
    if variant:  # first attempts keep the keys they always had, so existing caches stay valid
        parts.append(variant)
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def _write_error(path: Path, error: sqlite3.Error) -> OutputError:
    """sqlite's error as the one-line write failure the CLI reports: the file and the cause."""
    message = str(error)
    code = errno.ENOSPC if "full" in message else errno.EIO
    return OutputError(code, f"cannot write the translation cache {path}: {message}")


class TranslationCache:
    """Translations of protected chunks in sqlite; every insert is committed at once (crash-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Several DVC stages (or `dvc exp run --queue` workers) may share the cache: wait for their writes.
            self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS translations (key TEXT PRIMARY KEY, translation TEXT NOT NULL, "
                "source TEXT NOT NULL, backend TEXT NOT NULL, model TEXT NOT NULL, prompt_version TEXT NOT NULL, "
                "lang TEXT NOT NULL, created REAL NOT NULL)"
            )
            self._db.commit()
        except OSError as error:
            raise OutputError(
                error.errno, f"cannot write the translation cache {self.path}: {error.strerror}"
            ) from None
        except sqlite3.Error as error:
            raise _write_error(self.path, error) from None
        self._lock = threading.Lock()

    @classmethod
    def default(cls) -> TranslationCache:
        return cls(paths.translation_cache())

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), 500):
                batch = unique[start : start + 500]
                marks = ",".join("?" * len(batch))
                rows = self._db.execute(f"SELECT key, translation FROM translations WHERE key IN ({marks})", batch)
                found.update(rows.fetchall())
        return found

    def put(
        self, key: str, translation: str, *, source: str, backend: str, model: str, prompt_version: str, lang: str
    ) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, translation, source, backend, model, prompt_version, lang, time.time()),
                )
                self._db.commit()
            except sqlite3.Error as error:
                with contextlib.suppress(sqlite3.Error):
                    self._db.rollback()
                raise _write_error(self.path, error) from None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        self._db.close()
