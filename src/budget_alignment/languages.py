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


# --- scripts -------------------------------------------------------------------------------------------------------

# The script each language is written in, by the names of scoring/language.py's script patterns. Every lingua
# language not listed is written in the Latin script.
_SCRIPT: dict[str, str] = {
    "ja": "japanese",
    "zh": "han",
    "ko": "hangul",
    **dict.fromkeys(["ru", "uk", "be", "bg", "mk", "sr", "kk", "mn"], "cyrillic"),
    "el": "greek",
    **dict.fromkeys(["ar", "fa", "ur"], "arabic"),
    "he": "hebrew",
    **dict.fromkeys(["hi", "mr"], "devanagari"),
    "bn": "bengali",
    "pa": "gurmukhi",
    "gu": "gujarati",
    "ta": "tamil",
    "te": "telugu",
    "th": "thai",
    "ka": "georgian",
    "hy": "armenian",
}


def script_of(code: str) -> str:
    """The script a language is written in: `latin`, `japanese` (kana and Han), `han`, `hangul`, `cyrillic`, ..."""
    return _SCRIPT.get(code, "latin")


@cache
def same_script_languages(code: str) -> frozenset[str]:
    """Every language lingua knows that is written in the script of `code`, `code` included."""
    script = script_of(code)
    return frozenset(other for other in supported_languages() if script_of(other) == script) | {code}


# --- neighbours ----------------------------------------------------------------------------------------------------

# The languages lingua confuses with each language, measured by `benchmarks/language_judge.py --neighbours` on
# PolyMath's low and medium problems: X and T are neighbours when, with lingua choosing among T and English only, the
# judge accepts more than 5% of X's problem texts (of 20 letters or more, used as the reasoning) as T, or the other
# way round. The function words keep the other languages out, so lingua loads few models (each takes ~0.3 s).
# English is everyone's neighbour: it is what reasoning drifts into. A language without an entry gets every language
# of its script.
_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "de": (),
    "en": (),
    "es": ("fr", "it", "pt", "sw"),
    "fr": ("es", "pt"),
    "id": ("ms", "sw"),
    "it": ("es", "pt"),
    "ms": ("id", "sw"),
    "pt": ("es", "fr", "it"),
    "sw": ("es", "id", "ms"),
    "vi": (),
}


def neighbours(code: str) -> frozenset[str] | None:
    """The measured neighbours of `code` (English included), or None where they were not measured."""
    near = _NEIGHBOURS.get(code)
    return None if near is None else frozenset(near) | ({"en"} - {code})
