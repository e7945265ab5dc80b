"""Script-aware language consistency of a completion's reasoning and answer spans."""

from __future__ import annotations

from functools import cache


@cache
def supported_languages() -> frozenset[str]:
    """ISO 639-1 codes of every language the checker can judge (every language lingua supports)."""
    from lingua import Language

    return frozenset(language.iso_code_639_1.name.lower() for language in Language.all())
