"""What the Hugging Face hub sources (models and datasets) share: pinning a revision."""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)


def is_commit_hash(revision: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{40}", revision) is not None


def warn_if_unpinned(source: str, revision: str) -> None:
    if not is_commit_hash(revision):
        log.warning(
            "%s is pinned to %r, not to a commit hash: the run is not reproducible if the repository changes",
            source,
            revision,
        )
