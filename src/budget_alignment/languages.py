"""The languages the project knows: every language lingua identifies, by ISO 639-1 code, with its English name."""

from __future__ import annotations

from functools import cache


@cache
def supported_languages() -> frozenset[str]:
    """ISO 639-1 codes of every language the language checker can judge (every language lingua supports)."""
    from lingua import Language

    return frozenset(language.iso_code_639_1.name.lower() for language in Language.all())


@cache
def language_name(code: str) -> str:
    """`ja` -> `Japanese`; a code lingua does not know is an error."""
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())).name.title()
    except AttributeError:
        raise ValueError(f"unknown language code {code!r}") from None
