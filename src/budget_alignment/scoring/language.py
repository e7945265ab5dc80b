"""Script-aware language consistency of a completion's reasoning and answer spans (metric and reward alike).

A completion is split at the first `</think>` into the reasoning span and the answer span. Without `</think>`
the whole text is the reasoning span and the answer span is empty (so consistent: the missing answer is the
business of the format check, not of the language check).

From each span, what is not language is removed (LaTeX math, `\\boxed{}`, LaTeX commands, code, URLs, numbers,
single-letter variables, identifiers such as `total_cost`). The rest is cut into segments at sentence and line
ends, short segments merged so each holds at least `min_segment_letters` letters, and each segment is judged:

- by script first: most of its letters must be in the target language's script; Japanese also needs kana
  (Han without kana is Chinese) and Chinese must not have them;
- then, where several candidate languages share that script (French, Spanish, English ...): by the segment's
  function words when they clearly point to one candidate (the common case, and ten times cheaper), else by
  lingua restricted to those few candidates.

The span's share is the fraction of its letters that sit in target-language segments (the GRPO reward's graded
score); the span is in the language when that share reaches `min_target_share`. A span with fewer than
`min_letters` letters cannot be judged and counts as consistent, with share 1.0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Literal

from budget_alignment.languages import supported_languages

if TYPE_CHECKING:
    from lingua import Language, LanguageDetector

    from budget_alignment.params import LanguageCheckParams

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_spans(text: str) -> tuple[str, str, bool]:
    """(reasoning, answer, closed): split at the first `</think>`; a leading `<think>` is dropped.

    Without `</think>` (`closed` is False) the whole text is reasoning and the answer span is empty.
    """
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    reasoning = reasoning.lstrip()
    reasoning = reasoning.removeprefix(THINK_OPEN)
    return reasoning, answer, bool(closed)


# --- removing what is not language ---------------------------------------------------------------------------------

_LATIN_LETTER = r"A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
# (guards, pattern), applied in order: code and math first, so that their letters never reach the later rules.
# A pattern runs only when one of its guards is in the text: a substring test costs far less than a regex pass.
_NOT_LANGUAGE: list[tuple[tuple[str, ...], re.Pattern[str]]] = [
    (("```",), re.compile(r"```.*?(?:```|\Z)", re.S)),  # code blocks, also one left open by a truncation
    (("[asy]",), re.compile(r"\[asy\].*?(?:\[/asy\]|\Z)", re.S)),  # Asymptote figures in MATH solutions
    (("`",), re.compile(r"`[^`\n]+`")),
    (("://", "www."), re.compile(r"(?:https?://|www\.)\S+")),
    (("$$",), re.compile(r"\$\$.*?\$\$", re.S)),
    (("\\[",), re.compile(r"\\\[.*?\\\]", re.S)),
    (("\\(",), re.compile(r"\\\(.*?\\\)", re.S)),
    (("\\begin",), re.compile(r"\\begin\{([A-Za-z*]+)\}.*?\\end\{\1\}", re.S)),
    # Inline math stays on one line, so a lone currency `$` cannot swallow a paragraph.
    (("$",), re.compile(r"\$(?<!\\\$)(?:\\.|[^$\\\n])+\$")),
    (("\\boxed", "\\fbox"), re.compile(r"\\(?:boxed|fbox)\s*\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}")),
    (("\\",), re.compile(r"\\(?:[A-Za-z]+\*?|.)")),  # other commands: `\textbf{Réponse}` keeps its words
    (("_",), re.compile(r"\b[A-Za-z\d]*_\w*")),  # identifiers: x_1, total_cost
    # Each of the last three scans the whole text; they start with a character class so that re can skip ahead.
    ((), re.compile(r"[0-9]+")),  # other digits (full-width, ...) are not letters and never counted
    ((), re.compile(r"[A-Z](?<=\b[A-Z])[A-Z]{1,3}\b")),  # names of points and segments (AB, ABC), acronyms
    # Single-letter variables, Latin or Greek. `\b` is Unicode-aware: a letter glued to a word of any script stays,
    # and so does a French elision (l', d', qu').
    ((), re.compile(r"[A-Za-z\u0370-\u03ff](?<=\b.)\b(?!['’])")),
]


def strip_non_language(text: str) -> str:
    """The text with math, code, URLs, numbers and variables replaced by spaces; words and punctuation stay."""
    for guards, pattern in _NOT_LANGUAGE:
        if not guards or any(guard in text for guard in guards):
            text = pattern.sub(" ", text)
    return text


# --- scripts -------------------------------------------------------------------------------------------------------

# Letter counts come from runs of letters (`findall` + `len`), several times faster than one match per letter.
_LETTERS = re.compile(r"[^\W\d_]+")
_KANA = re.compile(r"[\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9d]+")
_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3005"
_SCRIPTS: dict[str, re.Pattern[str]] = {
    "latin": re.compile(f"[{_LATIN_LETTER}]+"),
    "japanese": re.compile(rf"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9d{_HAN}]+"),
    "han": re.compile(f"[{_HAN}]+"),
    "hangul": re.compile(r"[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]+"),
    "cyrillic": re.compile(r"[\u0400-\u052f]+"),
    "greek": re.compile(r"[\u0370-\u03ff\u1f00-\u1fff]+"),
    "arabic": re.compile(r"[\u0600-\u06ff\u0750-\u077f\ufb50-\ufdff\ufe70-\ufeff]+"),
    "hebrew": re.compile(r"[\u0590-\u05ff]+"),
    "devanagari": re.compile(r"[\u0900-\u097f]+"),
    "bengali": re.compile(r"[\u0980-\u09ff]+"),
    "gurmukhi": re.compile(r"[\u0a00-\u0a7f]+"),
    "gujarati": re.compile(r"[\u0a80-\u0aff]+"),
    "tamil": re.compile(r"[\u0b80-\u0bff]+"),
    "telugu": re.compile(r"[\u0c00-\u0c7f]+"),
    "thai": re.compile(r"[\u0e00-\u0e7f]+"),
    "georgian": re.compile(r"[\u10a0-\u10ff]+"),
    "armenian": re.compile(r"[\u0530-\u058f]+"),
}
# Every lingua language not listed is written in the Latin script.
_LANGUAGE_SCRIPT: dict[str, str] = {
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
# Kana tell Japanese from Chinese, which share the Han characters.
_KANA_RULE: dict[str, Literal["required", "forbidden"]] = {"ja": "required", "zh": "forbidden"}


def script_of(lang: str) -> str:
    return _LANGUAGE_SCRIPT.get(lang, "latin")


def _count(pattern: re.Pattern[str], text: str) -> int:
    return sum(map(len, pattern.findall(text)))


def count_letters(text: str) -> int:
    return _count(_LETTERS, text)


# --- function words ------------------------------------------------------------------------------------------------

# The most frequent words of a few Latin-script languages, shared ones included: a word is evidence for a language
# only when no other candidate lists it (so `que` counts for neither French nor Spanish). Single letters are
# missing on purpose: they are removed as variables before this step.
FUNCTION_WORDS: dict[str, frozenset[str]] = {
    lang: frozenset(words.split())
    for lang, words in {
        "en": "the and of to in is that it for as with was on be by this are we at from or an but not have has had "
        "which can will if so then than there their they its our us you all also any each into about when what how "
        "only one two three must would should could do does let me my now just same since because therefore here "
        "these those been were no get find need first next wait check gives",
        "fr": "le la les de des du un une et est en que qui dans pour par sur avec nous vous on ce cette ces il elle "
        "ils donc mais pas ne plus ou où être été avons sont son sa ses se leur car alors ainsi comme aussi très "
        "tout tous toute chaque deux trois soit faut peut doit cela puis encore déjà même après avant lorsque quand "
        "au aux me nos notre entre an non si sans sous vers fait donne obtient reste trouve",
        "es": "el la los las de del al un una unos unas es en que por para con se su sus lo le les como pero más "
        "este esta estos estas ese esa eso esto hay entonces también muy todo todos cada entre dos tres sea debe "
        "puede luego ya tiene tenemos hemos nos porque cuando donde después antes según mismo cual cuál qué ahora "
        "así sin sobre hasta desde son está están no me si sí nuestro obtenemos queda quedan vez aquí par",
        "pt": "os as do da dos das de em um uma que para com não por no na nos nas se mais como mas ao aos ele ela "
        "isso isto este esta então também muito cada entre dois três seja pode deve já tem temos são está estão sua "
        "seu quando onde depois antes sem sobre até desde me si porque assim ou aqui vez fica",
        "it": "il lo la gli le di del della dei delle un una uno che per con non in da dal dalla su sul sulla si "
        "come ma più questo questa quindi anche ogni tra fra due tre sia può deve già ha hanno sono suo sua quando "
        "dove dopo prima senza sopra fino poi allora così ancora qui volta abbiamo otteniamo",
        "de": "der die das und ist nicht ein eine einen einem mit den dem zu von für auf wir sich auch es im in des "
        "du sie er wird werden sind hat haben bei aus als wie wenn dann also noch nur so oder aber kann muss nach "
        "vor über unter zwei drei jede jeder dies diese dieser daher damit schon hier mal dass um an was war",
    }.items()
}


@cache
def distinctive_words(codes: frozenset[str]) -> dict[str, str] | None:
    """Function word -> language, for words that only one of `codes` lists; None if a language has no list."""
    if not codes <= FUNCTION_WORDS.keys():
        return None
    owners: dict[str, list[str]] = {}
    for code in codes:
        for word in FUNCTION_WORDS[code]:
            owners.setdefault(word, []).append(code)
    return {word: langs[0] for word, langs in owners.items() if len(langs) == 1}


def function_word_vote(words: Iterable[str], vocabulary: dict[str, str]) -> str | None:
    """The language whose function words clearly dominate `words` (lowercase), or None when evidence is thin or mixed.

    Clearly: at least two hits and three times as many as any other language. Mixed or short segments are left
    to lingua; this vote only saves lingua's time on the many segments whose language is plain (on MGSM and
    PolyMath questions it decides 86-98% of segments and agrees with lingua on all but a handful).
    """
    hits = Counter(map(vocabulary.get, words))
    hits.pop(None, None)
    if not hits:
        return None
    best = max(hits, key=hits.__getitem__)
    runner_up = max((count for lang, count in hits.items() if lang != best), default=0)
    return best if hits[best] >= 2 and hits[best] >= 3 * runner_up else None


# --- lingua ---------------------------------------------------------------------------------------------------------


def check_language_code(lang: str) -> None:
    if lang not in supported_languages():
        raise ValueError(
            f"language {lang!r} is not supported by the language checker "
            f"(ISO 639-1 codes of the languages lingua knows: {', '.join(sorted(supported_languages()))})"
        )


@cache
def _lingua_language(lang: str) -> Language:
    from lingua import IsoCode639_1, Language

    return Language.from_iso_code_639_1(getattr(IsoCode639_1, lang.upper()))


def identifier_candidates(lang: str, candidates: Iterable[str]) -> frozenset[str]:
    """The languages lingua chooses among for `lang`: the target plus the candidates written in its script.

    Other candidates are told apart by script alone. For a non-Latin script shared by a few lingua languages
    (Cyrillic, Arabic, Devanagari) all of them are candidates: without them lingua would have nothing to do.
    """
    script = script_of(lang)
    chosen = {lang} | {c for c in candidates if script_of(c) == script}
    if script != "latin":
        chosen |= {c for c in supported_languages() if script_of(c) == script}
    return frozenset(chosen)


@cache
def language_detector(codes: frozenset[str]) -> LanguageDetector:
    """A lingua detector over a few languages, built once per process (loading models costs ~0.3 s a language)."""
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_languages(*(_lingua_language(c) for c in sorted(codes))).build()


# --- the judgement -------------------------------------------------------------------------------------------------

# Sentence ends and line breaks; the punctuation goes with the split (it is not language).
_SENTENCE_BREAK = re.compile(r"[.!?;:。！？\n]+")


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of sentences judged as one: its words (runs of letters) and how many letters they hold."""

    words: list[str]
    letters: int

    @property
    def text(self) -> str:
        """The words alone: punctuation, numbers and math are not language, for lingua no more than for us."""
        return " ".join(self.words)


def segments(text: str, min_segment_letters: int) -> list[Segment]:
    """Sentences and lines, merged with the following ones until each holds `min_segment_letters` letters.

    A short tail is merged into the segment before it.
    """
    merged: list[Segment] = []
    words: list[str] = []
    letters = 0
    for piece in _SENTENCE_BREAK.split(text):
        piece_words = _LETTERS.findall(piece)
        if not piece_words:
            continue
        words += piece_words
        letters += sum(map(len, piece_words))
        if letters >= min_segment_letters:
            merged.append(Segment(words, letters))
            words, letters = [], 0
    if words:
        if merged:
            last = merged.pop()
            merged.append(Segment(last.words + words, last.letters + letters))
        else:
            merged.append(Segment(words, letters))
    return merged


@dataclass(frozen=True, slots=True)
class SpanJudgement:
    """One span: its letters (after removing math and code), the share in the target language, the verdict."""

    letters: int
    share: float
    in_lang: bool


@dataclass(frozen=True, slots=True)
class LanguageVerdict:
    """Both spans of a completion; `think_share` is the graded language reward."""

    think_in_lang: bool
    answer_in_lang: bool
    think_share: float
    answer_share: float

    @property
    def following(self) -> bool:
        return self.think_in_lang and self.answer_in_lang


@dataclass(frozen=True, slots=True)
class _TargetRule:
    """How a segment is recognised as the target language: script, kana rule, then word vote and lingua."""

    lang: str
    script: re.Pattern[str]
    kana: Literal["required", "forbidden"] | None
    detector: LanguageDetector | None
    words: dict[str, str] | None


class LanguageJudge:
    """Judges spans and completions against a target language with the thresholds of `LanguageCheckParams`.

    Build one per process and reuse it: the rules and lingua detectors of each language are built once.
    """

    def __init__(self, params: LanguageCheckParams | None = None) -> None:
        from budget_alignment.params import LanguageCheckParams

        self.params = params or LanguageCheckParams()
        for code in self.params.candidates:
            check_language_code(code)
        self._rules: dict[str, _TargetRule] = {}

    def _rule(self, lang: str) -> _TargetRule:
        rule = self._rules.get(lang)
        if rule is None:
            check_language_code(lang)
            codes = identifier_candidates(lang, self.params.candidates)
            several = len(codes) > 1
            rule = _TargetRule(
                lang=lang,
                script=_SCRIPTS[script_of(lang)],
                kana=_KANA_RULE.get(lang),
                detector=language_detector(codes) if several else None,
                words=distinctive_words(codes) if several else None,
            )
            self._rules[lang] = rule
        return rule

    def segment_in_language(self, segment: Segment, rule: _TargetRule, check_script: bool = True) -> bool:
        if check_script:
            text = segment.text
            in_script = _count(rule.script, text)
            if in_script * 2 < segment.letters:
                return False
            if rule.kana is not None:
                has_kana = _count(_KANA, text) >= self.params.min_kana_share * in_script
                if has_kana != (rule.kana == "required"):
                    return False
        if rule.detector is None:
            return True
        if rule.words is not None:
            voted = function_word_vote(segment.words, rule.words)
            if voted is not None:
                return voted == rule.lang
        detected = rule.detector.detect_language_of(segment.text)
        # lingua returns None only when it cannot decide; an undecidable segment is not evidence of a switch.
        return detected is None or detected == _lingua_language(rule.lang)

    def judge_span(self, span: str, lang: str) -> SpanJudgement:
        rule = self._rule(lang)
        # Lowercase once for the function-word vote; scripts, kana and lingua do not care about case.
        cleaned = strip_non_language(span).lower()
        parts = segments(cleaned, self.params.min_segment_letters)
        total = sum(part.letters for part in parts)
        if total < self.params.min_letters:
            return SpanJudgement(total, 1.0, True)
        # Most spans are written in one script: then only the kana rule needs a look segment by segment.
        check_script = rule.kana is not None or _count(rule.script, cleaned) < total
        in_language = sum(part.letters for part in parts if self.segment_in_language(part, rule, check_script))
        share = in_language / total
        return SpanJudgement(total, share, share >= self.params.min_target_share)

    def judge(self, text: str, lang: str) -> LanguageVerdict:
        """Judge a completion's reasoning span and answer span against the requested language `lang`."""
        reasoning, answer, _ = split_spans(text)
        think = self.judge_span(reasoning, lang)
        final = self.judge_span(answer, lang)
        return LanguageVerdict(think.in_lang, final.in_lang, think.share, final.share)


@cache
def _default_judge() -> LanguageJudge:
    return LanguageJudge()


def judge_language(text: str, lang: str, params: LanguageCheckParams | None = None) -> LanguageVerdict:
    """Judge one completion; with `params` None, the defaults of `LanguageCheckParams`."""
    judge = _default_judge() if params is None else LanguageJudge(params)
    return judge.judge(text, lang)
