"""A medical answer judged beyond its letter: the post's "tiny medical reward head" (terminology fidelity and claim
calibration), a pure function of the completion and the problem record.

- **Names its option.** The answer region (after `</think>`, else the whole text) names the text of the option its
  letter chose, as the record gives it in the requested language (`C` and "globules rouges", not `C` alone, nor
  "red blood cells" when asked in French), and that region is in the requested language.
- **Calibrated.** The completion makes no over-assertive claim: none of the absolute words of `ABSOLUTE_CLAIMS`
  (always, never, definitely, 100% ...) in any of the four languages, reasoning included. The post's mechanism:
  "the policy over-indexes math heuristics and becomes over-assertive on clinical QA". A word list is a heuristic:
  it flags a true "always" as well, and misses a confident tone without these words.

Each half is worth 0.5; a completion that chooses no option (none, several, or a letter that is not an option) scores
0.0. Whether the chosen option is the right one is the accuracy check's business, not this one's.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from budget_alignment.scoring.answers import answer_region, check_choice
from budget_alignment.scoring.language import LanguageJudge

# Words and phrases of certainty a calibrated clinical answer avoids, per language (lowercase; Latin ones matched as
# whole words). French "sans doute" means "probably" and is not listed; "sans aucun doute" is.
ABSOLUTE_CLAIMS: dict[str, tuple[str, ...]] = {
    "en": ("always", "never", "definitely", "certainly", "undoubtedly", "guaranteed", "guarantees", "absolutely",
           "without a doubt", "without any doubt", "no doubt", "impossible", "100%", "100 %"),
    "fr": ("toujours", "jamais", "certainement", "assurément", "sans aucun doute", "garanti", "garantie", "absolument",
           "à coup sûr", "forcément", "impossible", "100%", "100 %"),
    "es": ("siempre", "nunca", "jamás", "sin duda", "sin ninguna duda", "definitivamente", "garantizado",
           "garantizada", "absolutamente", "ciertamente", "con total seguridad", "imposible", "100%", "100 %"),
    "ja": ("必ず", "絶対", "間違いなく", "確実に", "決して", "疑いなく", "100%", "100％", "100パーセント"),
}  # fmt: skip

NO_OPTION = "chooses no option"
NAMES_OPTION = "names its option"
DOES_NOT_NAME = "does not name its option's text"
NOT_IN_LANGUAGE = "answer not in the requested language"


@dataclass(frozen=True, slots=True)
class MedicalAnswerCheck:
    """The judgement of one medical answer: the letter chosen, the two halves, the claims flagged, the score."""

    letter: str | None
    names_option: bool
    absolute_claims: tuple[str, ...]
    score: float
    reason: str


def _folded(text: str) -> str:
    """NFKC (full-width to ASCII), lowercase, whitespace collapsed: how an option's text is looked for."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).casefold().strip()


@cache
def _claims_pattern() -> re.Pattern[str]:
    words = sorted({word for words in ABSOLUTE_CLAIMS.values() for word in words}, key=len, reverse=True)
    # Latin words stand alone (`never`, not `nevertheless`); Japanese has no spaces to mark a word.
    parts = [re.escape(word) if not word[0].isascii() or not word[0].isalpha() else rf"\b{re.escape(word)}\b"
             for word in words]  # fmt: skip
    return re.compile("|".join(parts), re.IGNORECASE)


def absolute_claims(text: str) -> tuple[str, ...]:
    """The over-assertive words of `text`, in order (lowercased)."""
    return tuple(match.group().lower() for match in _claims_pattern().finditer(unicodedata.normalize("NFKC", text)))


def option_named(region: str, option: str) -> bool:
    """Whether `region` contains the option's text (a parenthesized gloss may be left out: `Fémur (os de la cuisse)`
    is named by `fémur`)."""
    folded = _folded(region)
    names = {_folded(option), _folded(re.sub(r"\s*\([^)]*\)", "", option))}
    return any(name and name in folded for name in names)


def check_medical_answer(
    text: str, choices: Mapping[str, str], lang: str, judge: LanguageJudge | None = None
) -> MedicalAnswerCheck:
    """Judge a completion to a multiple-choice medical question asked in `lang` (see the module docstring)."""
    chosen = check_choice(text, "", choices=choices).extracted
    claims = absolute_claims(text)
    calibrated = 0.0 if claims else 0.5
    if chosen is None or chosen not in choices:
        return MedicalAnswerCheck(None, False, claims, 0.0, NO_OPTION)
    region = answer_region(text)
    named = option_named(region, choices[chosen])
    in_language = (judge or LanguageJudge()).judge_span(region, lang).in_lang
    reason = NAMES_OPTION if named and in_language else DOES_NOT_NAME if not named else NOT_IN_LANGUAGE
    return MedicalAnswerCheck(
        chosen, named and in_language, claims, calibrated + 0.5 * (named and in_language), reason
    )
