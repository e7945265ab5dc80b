"""Script-aware language consistency of a completion's reasoning and answer spans (metric and reward alike).

A completion is split at the first `</think>` into the reasoning span and the answer span. Without `</think>`
the whole text is the reasoning span and the answer span is empty (so consistent: the missing answer is the
business of the format check, not of the language check).

From each span, what is not language is removed (LaTeX math, `\\boxed{}`, LaTeX commands, code, URLs, numbers,
single-letter variables, identifiers such as `total_cost`). The rest is cut into sentences at sentence and line
ends, and each sentence is judged on its own:

- by script: most of its letters must be in the target language's script (a Korean or an English sentence is not
  Japanese); a Japanese sentence needs kana (Han characters without kana are Chinese) and a Chinese one must have none;
- where other languages share the script, by function words first: the distinctive words of a dozen Latin-script
  languages (`FUNCTION_WORDS`) confirm the target, or show another language, without lingua (the common case, and
  ten times cheaper); a sentence of several words without a single function word of the target is suspect;
- then by lingua, choosing among the target, English and the target's measured neighbours (`candidates`, see
  languages.py: Portuguese, Italian and French for Spanish ...), or every language of the script.

lingua counts against the target only with enough evidence: the log of its confidence in the winner over its
confidence in the target must reach `min_other_log_odds`. Adjacent sentences whose evidence agrees (the same winner,
or Han without kana) are weighed together, so a run of short sentences in one language adds up, while a change of
language between two sentences is a boundary: a switch is never merged away.

Letters are counted at what they carry: a Han character as three Latin letters, a kana character or a Hangul
syllable as one and a half or two (English letters per character on PolyMath's parallel problems), so one Chinese
sentence is judged. The span's share is the fraction of its letters that sit in target-language sentences (the GRPO
reward's graded score); the span is in the language when that share reaches `min_target_share`. A span with fewer
than `min_letters` letters holds no evidence and counts as consistent, with share 1.0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Literal

from budget_alignment.languages import neighbours, same_script_languages, script_of, supported_languages
from budget_alignment.params import LanguageCheckParams

if TYPE_CHECKING:
    from lingua import Language, LanguageDetector

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


# --- scripts and how much their letters say ------------------------------------------------------------------------

# Letter counts come from runs of letters (`findall` + `len`), several times faster than one match per letter.
_LETTERS = re.compile(r"[^\W\d_]+")
_KANA_CLASS = r"\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9d"
_HAN_CLASS = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3005"
_HANGUL_CLASS = r"\uac00-\ud7af\u1100-\u11ff\u3130-\u318f"
_KANA = re.compile(f"[{_KANA_CLASS}]+")
_HAN = re.compile(f"[{_HAN_CLASS}]+")
_HANGUL = re.compile(f"[{_HANGUL_CLASS}]+")
# A text without any character from U+3040 on has no kana, Han or Hangul: one search spares three counts.
_WIDE = re.compile(f"[{_KANA_CLASS}{_HAN_CLASS}{_HANGUL_CLASS}]")
# English letters per character of PolyMath's parallel problems (all levels, math removed): Chinese 3.0 per Han
# character; Japanese 3.6 per kanji and 1.4 per kana (least squares); Korean 2.2 per Hangul syllable.
HAN_LETTERS = 3.0
KANA_LETTERS = 1.5
HANGUL_LETTERS = 2.0
_SCRIPTS: dict[str, re.Pattern[str]] = {
    "latin": re.compile(f"[{_LATIN_LETTER}]+"),
    "japanese": re.compile(f"[{_KANA_CLASS}{_HAN_CLASS}]+"),
    "han": _HAN,
    "hangul": _HANGUL,
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
# Languages that capitalize every noun, not only names.
_CAPITALIZED_NOUNS = frozenset({"de"})
# Kana tell Japanese from Chinese, which share the Han characters.
_KANA_RULE: dict[str, Literal["required", "forbidden"]] = {"ja": "required", "zh": "forbidden"}
# Frequent simplified characters that Japanese writes otherwise (这/這, 们/們, 个/個, 为/為, 时/時, 值/値, 设/設 ...):
# one of them in Han text without kana is Chinese, however short the sentence ("设 求 的值").
SIMPLIFIED_ONLY = frozenset(
    "这们个为时对设则应还过说从样长边题级极值积两么吗呢给实开关间问头东车门买卖钱张种结总书满线颗价现带场计师围"
    "义单请节约纸课电进领费资辆图达质项顶离贴购钟尔鸡龙铃饼响维"
)


def _count(pattern: re.Pattern[str], text: str) -> int:
    return sum(map(len, pattern.findall(text)))


def count_letters(text: str) -> float:
    """Letters' worth of language in `text`: a Latin (Cyrillic, ...) letter is 1, Han 3, kana 1.5, Hangul 2."""
    letters = float(_count(_LETTERS, text))
    if _WIDE.search(text):
        letters += (
            (HAN_LETTERS - 1) * _count(_HAN, text)
            + (KANA_LETTERS - 1) * _count(_KANA, text)
            + (HANGUL_LETTERS - 1) * _count(_HANGUL, text)
        )
    return letters


def _script_letters(script: str, text: str) -> float:
    """Letters' worth of `text` written in `script`."""
    if script == "japanese":
        return HAN_LETTERS * _count(_HAN, text) + KANA_LETTERS * _count(_KANA, text)
    weight = {"han": HAN_LETTERS, "hangul": HANGUL_LETTERS}.get(script, 1.0)
    return weight * _count(_SCRIPTS[script], text)


# --- function words ------------------------------------------------------------------------------------------------

# The most frequent words of the Latin-script languages a reasoning model writes (the project's targets, their
# neighbours, and the other Latin-script languages of PolyMath and MGSM), and the imperatives math problems open with.
# Single letters are missing on purpose: they are removed as variables before this step. A word counts for a language
# only where no other list has it (`que` counts for none of French, Spanish, Portuguese and Catalan); see
# `function_word_vote`.
FUNCTION_WORDS: dict[str, frozenset[str]] = {
    lang: frozenset(words.split())
    for lang, words in {
        "en": "the and of to in is that it for as with was on be by this are we at from or an but not have has had "
        "which can will if so then than there their they its our us you all also any each into about when what how "
        "only one two three must would should could do does let me my now just same since because therefore here "
        "these those been were no get find need first next wait check gives he she his her him many much more less "
        "did every given over after before off out up down again both compute calculate determine evaluate simplify "
        "solve prove show",
        "fr": "le la les de des du un une et est en que qui dans pour par sur avec nous vous on ce cette ces il elle "
        "ils donc mais pas ne plus ou où être été avons sont son sa ses se leur car alors ainsi comme aussi très "
        "tout tous toute chaque deux trois soit faut peut doit cela puis encore déjà même après avant lorsque quand "
        "au aux me nos notre entre an non si sans sous vers fait donne obtient reste trouve à était avait ont leurs "
        "lui quel quelle quels quelles combien sinon calculez calculer calcule trouvez trouver déterminez déterminer "
        "montrez simplifiez résolvez évaluez évaluer soient",
        "es": "el la los las de del al un una unos unas es en que por para con se su sus lo le les como pero más "
        "este esta estos estas ese esa eso esto hay entonces también muy todo todos cada entre dos tres sea debe "
        "puede luego ya tiene tenemos hemos nos porque cuando donde después antes según mismo cual cuál qué ahora "
        "así sin sobre hasta desde son está están no me si sí nuestro obtenemos queda quedan vez aquí par cuántos "
        "cuántas cuánto cuánta fue era él ella ellos ellas uno toda todas calcula calcule calcular encuentra "
        "encuentre halla halle determina determine demuestra simplifica resuelve evalúa evalúe sean",
        "pt": "os as do da dos das de em um uma que para com não por no na nos nas se mais como mas ao aos ele ela "
        "isso isto este esta então também muito cada entre dois três seja pode deve já tem temos são está estão sua "
        "seu quando onde depois antes sem sobre até desde me si porque assim ou aqui vez fica é qual quais quanto "
        "quanta quantos quantas foi foram pelo pela pelos pelas eles elas dele dela seus suas todo todos toda todas "
        "à era calcule calcula calcular encontre determine mostre simplifique resolva avalie sejam prove",
        "it": "il lo la gli le di del della dei delle un una uno che per con non in da dal dalla su sul sulla si "
        "come ma più questo questa quindi anche ogni tra fra due tre sia può deve già ha hanno sono suo sua quando "
        "dove dopo prima senza sopra fino poi allora così ancora qui volta abbiamo otteniamo è nei nel nella al alla "
        "ai ed ci quale quanto quanta quanti quante suoi sue loro mentre ciascuno se ne qual era alle li quelle ho "
        "all dell nell sull dall calcola calcolare trova trovare determina dimostra semplifica risolvi valuta siano",
        "de": "der die das und ist nicht ein eine einen einem mit den dem zu von für auf wir sich auch es im in des "
        "du sie er wird werden sind hat haben bei aus als wie wenn dann also noch nur so oder aber kann muss nach "
        "vor über unter zwei drei jede jeder dies diese dieser daher damit schon hier mal dass um an was war pro "
        "sein seine ihr ihre kein keine viele alle berechne berechnen bestimme bestimmen finde zeige vereinfache "
        "löse sei seien",
        "ca": "el la els les de del dels un una uns unes és que per amb no en als al com però més aquest aquesta "
        "aquests aquestes això doncs també molt cada entre dos tres sigui ha han hem són està estan seu seva seus "
        "seves quan on després abans sense sobre fins des ja tenim cal si perquè així aquí vegada ens hi ho li "
        "llavors tot tots totes calcula calculeu troba trobeu determina demostra simplifica resol siguin",
        "nl": "de het een en van in is dat op te zijn met voor niet aan er die als bij ook om maar dan zo nog wel "
        "uit door over naar heeft hebben wordt worden kan moet we wij ze hij zij dit deze wat hoe waar wanneer omdat "
        "dus twee drie elke elk alle geen tot na onder tussen zal zou",
        "id": "yang dan di ke dari ini itu untuk dengan adalah tidak akan pada juga dalam atau ada oleh sebagai jika "
        "maka kita kami bisa dapat sudah telah harus setiap semua berapa banyak tersebut karena agar sehingga bahwa "
        "hanya lebih antara satu dua tiga tentukan hitunglah berikut nilai",
        "ms": "yang dan di ke dari ini itu untuk dengan adalah tidak akan pada juga dalam atau ada oleh sebagai jika "
        "maka kita kami boleh dapat sudah telah mesti setiap semua berapa banyak tersebut kerana supaya sehingga "
        "bahawa hanya lebih antara satu dua tiga tentukan hitung berikut nilai",
        "sw": "na ya wa za kwa la katika ni kama hii hiyo huo hizi hayo cha vya kila pia lakini au ambayo ambao "
        "ambaye je ngapi gani kuna hakuna kuwa ili basi sasa moja mbili tatu zaidi kati yake yao wake yeye wao hivyo "
        "kwamba baada kabla bila",
        "vi": "của và là có không các những một được cho với này trong để thì khi nếu ta số bao nhiêu hãy tìm tính "
        "giá trị mỗi đó rằng như cũng đã sẽ người bằng hai ba hay hoặc nên vì từ đến trên dưới sau trước",
    }.items()
}
# The vote needs at least this many words of the winning language, and this many times the runner-up's.
VOTE_MIN_WORDS = 2
VOTE_MARGIN = 3
# A sentence of at least this many words without one function word of the target language is suspect: lingua must
# prefer the target by `min_other_log_odds` for it to count. Of PolyMath's sentences (low, medium) of five words or
# more, 0-1.5% in en/fr/es/pt/it/de have none of their language's words (short MGSM sentences once the numbers are
# gone: "terry mangia yogurt al giorno"), against 70-100% in any other language, lingua's candidates or not.
SUSPECT_WORDS = 5


# Languages whose function words are nearly the same vote as one (lingua tells them apart).
VOTE_TOGETHER: dict[str, frozenset[str]] = {code: frozenset({"id", "ms"}) for code in ("id", "ms")}


def voters(code: str) -> frozenset[str]:
    """The languages that vote with `code` (itself, or its group)."""
    return VOTE_TOGETHER.get(code, frozenset({code}))


@cache
def distinctive_words() -> dict[str, frozenset[str]]:
    """Function word -> the languages voting with it, for the words that only one language (or group) lists."""
    owners: dict[str, set[frozenset[str]]] = {}
    for code, words in FUNCTION_WORDS.items():
        for word in words:
            owners.setdefault(word, set()).add(voters(code))
    return {word: next(iter(groups)) for word, groups in owners.items() if len(groups) == 1}


def function_word_hits(words: Iterable[str]) -> Counter[frozenset[str]]:
    """How many distinctive function words of each language (or group) `words` (lowercase) hold."""
    hits = Counter(map(distinctive_words().get, words))
    hits.pop(None, None)
    return hits  # type: ignore[return-value]


def function_word_vote(hits: Counter[frozenset[str]], lang: str | None = None) -> frozenset[str] | None:
    """The language (or group) whose function words plainly dominate a sentence's `hits`; None when the evidence is
    thin or mixed.

    Plainly: at least two of its distinctive words, and three times as many as any other language has; for the
    target `lang` one word is enough when no other language has any (it confirms what is expected: Portuguese text
    without a Portuguese word but with a Spanish one is rare, and lingua still judges every sentence not confirmed).
    A word shared by two lists is evidence for neither, so Portuguese words never vote Spanish; a language without a
    list cannot win the vote, and its text (few listed words) is left to lingua.
    """
    if not hits:
        return None
    (best, count), *rest = hits.most_common()
    runner_up = rest[0][1] if rest else 0
    least = 1 if lang is not None and lang in best else VOTE_MIN_WORDS
    return best if count >= least and count >= VOTE_MARGIN * runner_up else None


def lacks_function_words(words: list[str], lang: str, read: str) -> bool:
    """True for a sentence of SUSPECT_WORDS words or more (names aside: `read`) without any function word of `lang`."""
    own = FUNCTION_WORDS.get(lang)
    return own is not None and read.count(" ") + 1 >= SUSPECT_WORDS and own.isdisjoint(words)


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


def identifier_candidates(lang: str, candidates: Literal["neighbours", "script"]) -> frozenset[str]:
    """The languages lingua chooses among for `lang`, `lang` included.

    `script`: every language lingua knows in `lang`'s script. `neighbours`: `lang`, English and the languages lingua
    confuses with `lang` (languages.py's measured table); a Latin-script language without a measured entry gets
    every language of its script. Languages of another script are told apart by script alone.
    """
    same_script = same_script_languages(lang)
    if candidates == "neighbours" and (near := neighbours(lang)) is not None:
        return frozenset({lang} | {code for code in near if code in same_script})
    return same_script


@cache
def language_detector(codes: frozenset[str]) -> LanguageDetector:
    """A lingua detector over `codes`, built once per process with its models loaded (~0.3 s a language)."""
    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_languages(*(_lingua_language(c) for c in sorted(codes)))
    return builder.with_preloaded_language_models().build()


# lingua rounds its confidences to five decimals: a language it rules out gets 0, taken as this.
_LEAST_CONFIDENCE = 1e-5


@lru_cache(maxsize=16384)
def language_odds(codes: frozenset[str], text: str, lang: str) -> tuple[str, float] | None:
    """(lingua's winner among `codes`, log-odds of the winner over `lang`); for `lang` itself, minus its log-odds over
    the runner-up. None when lingua reads nothing.

    The log of the ratio of lingua's confidences: it grows with the evidence the text holds (a one-word sentence
    rarely reaches 1, a Portuguese sentence of 120 letters read as Spanish about 3, a paragraph the cap of 11.5 that
    lingua's rounding to five decimals sets). Cached: short sentences ("Donc :", "Réponse :", "Wait,") come back in
    completion after completion.
    """
    values = language_detector(codes).compute_language_confidence_values(text)
    if not values or values[0].value == 0.0:
        return None
    winner = values[0].language
    if winner == _lingua_language(lang):
        runner_up = values[1].value if len(values) > 1 else 0.0
        return lang, -math.log(values[0].value / max(runner_up, _LEAST_CONFIDENCE))
    mine = next((value.value for value in values if value.language == _lingua_language(lang)), 0.0)
    return winner.iso_code_639_1.name.lower(), math.log(values[0].value / max(mine, _LEAST_CONFIDENCE))


# --- sentences -----------------------------------------------------------------------------------------------------

# Sentence ends and line breaks; the punctuation goes with the split (it is not language).
_SENTENCE_BREAK = re.compile(r"[.!?;:。！？；：\n]+")


@dataclass(frozen=True, slots=True)
class Sentence:
    """One sentence: its words (runs of letters, lowercase), its letters' worth of language, and what lingua reads."""

    words: list[str]
    letters: float
    # The words alone (punctuation, numbers and math are not language, for lingua no more than for us), less the
    # proper names when the sentence's language capitalizes only them.
    text: str


def sentences(text: str, names: bool = False) -> list[Sentence]:
    """The sentences and lines of `text` (math and code already removed) that hold letters.

    With `names` (for a Latin-script language), a capitalized word after a sentence's first is a name (Emily, Jackson,
    Pokémon): lingua does not read it, names belong to no language. Not for German, which capitalizes every noun.
    """
    wide = _WIDE.search(text) is not None
    found = []
    for piece in _SENTENCE_BREAK.split(text):
        lowered = piece.lower()
        words = _LETTERS.findall(lowered)
        if not words:
            continue
        read = " ".join(words)
        if names and lowered != piece:
            first = _LETTERS.search(piece)
            rest = piece[first.end() :] if first else ""
            if rest.lower() != rest:  # a capital after the first word: look word by word (rare, so not every time)
                capitalized = [word[0].isupper() for word in _LETTERS.findall(piece)]
                if len(capitalized) == len(words):
                    kept = (word for word, upper in zip(words[1:], capitalized[1:], strict=True) if not upper)
                    read = " ".join([words[0], *kept])
        letters = count_letters(piece) if wide else float(sum(map(len, words)))
        found.append(Sentence(words, letters, read))
    return found


# --- the judgement -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpanJudgement:
    """One span: its letters' worth of language (math and code removed), the share in the target language, verdict."""

    letters: float
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
    """How a sentence is recognised as the target language: script, kana rule, function words, lingua."""

    lang: str
    script: str
    kana: Literal["required", "forbidden"] | None
    candidates: frozenset[str] | None  # what lingua chooses among (None: the script decides alone)


# What a sentence's evidence says, before adjacent sentences that agree are weighed together: `None` for the target;
# otherwise (kind of evidence, the other language when known, lingua's log-odds of it over the target).
_Evidence = tuple[str, str, float] | None
_SCRIPT_EVIDENCE = ("script", "", math.inf)  # another script, or kana in a Chinese sentence
_WORDS = "words"  # another language's function words
_SUSPECT = ("words", "", math.inf)  # no function word of the target, and lingua does not clearly prefer it
_HAN_ONLY = "han"  # Han without kana for Japanese: Chinese when there is enough of it
_LINGUA = "lingua"
# Spans of at most this many characters (math removed) are remembered, up to this many of them.
_SHORT_SPAN = 200
_SHORT_SPANS_KEPT = 4096


class LanguageJudge:
    """Judges spans and completions against a target language with the thresholds of `LanguageCheckParams`.

    Build one per process and reuse it: the rules and lingua detectors of each language are built once.
    """

    def __init__(self, params: LanguageCheckParams | None = None) -> None:
        self.params = params or LanguageCheckParams()
        self._rules: dict[str, _TargetRule] = {}
        # Short spans come back word for word ("The answer is $\\boxed{5}$." once the math is gone): judged once.
        self._short_spans: dict[tuple[str, str], SpanJudgement] = {}

    def _rule(self, lang: str) -> _TargetRule:
        rule = self._rules.get(lang)
        if rule is None:
            check_language_code(lang)
            codes = identifier_candidates(lang, self.params.candidates)
            rule = _TargetRule(
                lang=lang,
                script=script_of(lang),
                kana=_KANA_RULE.get(lang),
                candidates=codes if len(codes) > 1 else None,
            )
            if rule.candidates is not None:
                language_detector(rule.candidates)  # load the models now, not in the middle of the first span
            self._rules[lang] = rule
        return rule

    def sentence_evidence(self, sentence: Sentence, rule: _TargetRule, check_script: bool = True) -> _Evidence:
        """What one sentence says against the target language (None: nothing, it reads as the target)."""
        if check_script:
            text = " ".join(sentence.words)  # every word, names included: they are written in some script
            in_script = _script_letters(rule.script, text)
            if in_script * 2 < sentence.letters:
                return _SCRIPT_EVIDENCE
            if rule.kana is not None:
                han, kana = _count(_HAN, text), _count(_KANA, text)
                has_kana = kana > 0 and kana >= self.params.min_kana_share * (han + kana)
                if rule.kana == "forbidden" and has_kana:
                    return _SCRIPT_EVIDENCE
                if rule.kana == "required" and han and not has_kana:
                    return _SCRIPT_EVIDENCE if SIMPLIFIED_ONLY.intersection(text) else (_HAN_ONLY, "zh", math.inf)
        hits: Counter[frozenset[str]] = Counter()
        suspect = False
        if rule.lang in FUNCTION_WORDS:
            hits = function_word_hits(sentence.words)
            voted = function_word_vote(hits, rule.lang)
            if voted is not None and rule.lang not in voted:
                return (_WORDS, min(voted), math.inf)
            if voted == {rule.lang}:
                return None
            suspect = voted is None and lacks_function_words(sentence.words, rule.lang, sentence.text)
        if rule.candidates is None:  # lingua has nothing to choose among (English, told apart by function words)
            return None
        if rule.lang in FUNCTION_WORDS and FUNCTION_WORDS[rule.lang].issuperset(sentence.words):
            return None  # every word is the target's: lingua may prefer a neighbour that shares them ("Calcule")
        found = language_odds(rule.candidates, sentence.text, rule.lang)
        if suspect:  # no function word of the target: it must be lingua's clear choice
            return None if found is not None and found[1] <= -self.params.min_other_log_odds else _SUSPECT
        if found is None or found[1] <= 0:
            return None
        if hits[voters(found[0])] and not hits[voters(rule.lang)]:
            return (_WORDS, found[0], math.inf)  # lingua and a function word of the winner agree: "é", "uma", "the"
        return (_LINGUA, *found)

    def _against(self, kind: str, letters: float, odds: float, total: float) -> bool:
        """Whether a run of agreeing sentences (`letters` of the span's `total`) holds enough evidence against it."""
        if kind == _HAN_ONLY:
            return letters >= self.params.min_han_letters
        if kind == _LINGUA:
            # A short run inside a longer span needs twice the evidence: a name and a noun ("Carla a 100 euros.")
            # can look foreign to lingua. A span that is nothing but the run ("Compute: $...$") is judged on it.
            needed = self.params.min_other_log_odds
            if letters < self.params.min_other_letters and letters < total:
                needed *= 2
            return odds >= needed
        return True  # another script, another language's function words

    def _runs(
        self, parts: list[Sentence], rule: _TargetRule, check_script: bool, total: float
    ) -> Iterator[tuple[float, bool]]:
        """(letters, in the target language) per run of adjacent sentences whose evidence agrees."""
        kind, winner, letters, odds = "", "", 0.0, 0.0
        for part in parts:
            evidence = self.sentence_evidence(part, rule, check_script)
            if evidence is not None and evidence[:2] == (kind, winner):
                letters += part.letters
                odds += evidence[2]
                continue
            if letters:
                yield letters, not self._against(kind, letters, odds, total)
            if evidence is None:
                kind, winner, letters, odds = "", "", 0.0, 0.0
                yield part.letters, True
            else:
                kind, winner, odds = evidence
                letters = part.letters
        if letters:
            yield letters, not self._against(kind, letters, odds, total)

    def judge_span(self, span: str, lang: str) -> SpanJudgement:
        rule = self._rule(lang)
        cleaned = strip_non_language(span)
        if len(cleaned) > _SHORT_SPAN:
            return self._judge_cleaned(cleaned, rule)
        key = (lang, cleaned)
        found = self._short_spans.get(key)
        if found is None:
            if len(self._short_spans) >= _SHORT_SPANS_KEPT:
                self._short_spans.clear()
            found = self._short_spans[key] = self._judge_cleaned(cleaned, rule)
        return found

    def _judge_cleaned(self, cleaned: str, rule: _TargetRule) -> SpanJudgement:
        parts = sentences(cleaned, names=rule.script == "latin" and rule.lang not in _CAPITALIZED_NOUNS)
        total = sum(part.letters for part in parts)
        if total < self.params.min_letters:
            return SpanJudgement(total, 1.0, True)
        # Most spans are written in one script: then only the kana rule needs a look sentence by sentence.
        check_script = rule.kana is not None or _script_letters(rule.script, cleaned) < total
        in_language = sum(letters for letters, ours in self._runs(parts, rule, check_script, total) if ours)
        share = min(1.0, in_language / total)
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
