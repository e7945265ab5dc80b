"""The final answer of a completion, checked against the gold: math answers with math-verify, choices as letters.

The final answer is the last `\\boxed{...}` after `</think>` (the whole text when there is no `</think>`); without
a box, the last "answer:" phrase (en/ja/fr/es) counts. Math answers are normalized for the notations models
write in Japanese, French and Spanish (full-width digits, the decimal comma, `]0 ; 5[` intervals, unit words in
any script) before math-verify compares them. Checking is a registry keyed by `Problem.answer_type`.

math-verify bounds its sympy work with `signal.alarm`, which only works in the main thread: the timeouts are on
in a process's main thread (a pool worker's too) and off elsewhere, automatically.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from budget_alignment.scoring.language import split_spans

NO_ANSWER = "no answer found"
MATCHES = "matches gold"
NO_MATCH = "does not match gold"
SEVERAL_LETTERS = "several letters boxed"
NOT_A_CHOICE = "not one of the choices"

DEFAULT_TIMEOUT_S = 5

# Languages that write 0,5 for one half (and 1 000 or 1.000 for a thousand). Others use the decimal point.
DECIMAL_COMMA_LANGUAGES = frozenset(
    {"af", "az", "be", "bg", "bs", "ca", "cs", "da", "de", "el", "es", "et", "eu", "fi", "fr", "hr", "hu", "hy", "id"}
    | {"is", "it", "ka", "kk", "lt", "lv", "mk", "mn", "nb", "nl", "nn", "pl", "pt", "ro", "ru", "sk", "sl", "sq"}
    | {"sr", "sv", "tr", "uk", "vi"}
)


@dataclass(frozen=True, slots=True)
class AnswerCheck:
    """The judgement of one completion's final answer: what was extracted, whether it is right, and why."""

    extracted: str | None
    correct: bool
    reason: str


# --- finding the answer --------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "The answer is", "Answer:", "Réponse :", "La respuesta es", "答えは", "解答：" ...; `**` so that markdown bold
# around the phrase ("**Réponse :** 12") does not hide it.
_ANSWER_PHRASE = re.compile(
    r"(?:the\s+(?:final\s+|correct\s+)?answer\s+is|(?:final\s+)?answer\s*[:：]"
    r"|la\s+(?:bonne\s+)?réponse\s+(?:finale\s+|correcte\s+)?est|réponse(?:\s+finale)?\s*[:：]"
    r"|la\s+respuesta\s+(?:final\s+|correcta\s+)?es|respuesta(?:\s+final)?\s*[:：]"
    r"|(?:最終的な)?(?:答え|解答|正解)\s*(?:は|[:：]))"
    r"(?:\s*\*\*)?\s*",
    re.IGNORECASE,
)
# Where an answer given after a phrase ends: a line break, or a sentence end that is not a decimal point.
_SNIPPET_END = re.compile(r"\n|。|[.!?](?!\d)(?:\s|$)")
_FULL_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20, 0x2212: 0x2D}


def to_half_width(text: str) -> str:
    """Full-width ASCII (`１２`, `Ｂ`, `（`) and the minus sign to plain ASCII; other characters are kept."""
    return text.translate(_FULL_WIDTH)


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` (and `\\fbox{...}`) in `text`, in order; nested braces are kept."""
    contents = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for index in range(start, len(text)):
            char = text[index]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    contents.append(text[start:index].strip())
                    break
    return contents


def answer_region(text: str) -> str:
    """Where the final answer is looked for: after `</think>`, or the whole text when there is none."""
    reasoning, answer, closed = split_spans(text)
    return answer if closed else reasoning


def format_ok(text: str) -> bool:
    """The answer format the GRPO reward asks for: a closed reasoning span, then a non-empty `\\boxed{}`."""
    _, answer, closed = split_spans(text)
    return closed and any(boxed_contents(answer))


def answer_phrase_snippet(region: str) -> str | None:
    """What follows the last "answer:" phrase, up to the end of its sentence or line."""
    phrases = list(_ANSWER_PHRASE.finditer(region))
    if not phrases:
        return None
    rest = region[phrases[-1].end() :]
    end = _SNIPPET_END.search(rest)
    snippet = (rest[: end.start()] if end else rest).strip().strip("*").strip()
    return snippet or None


# --- math answers --------------------------------------------------------------------------------------------------

_PERCENT = re.compile(r"\s*\\?%\s*$")
_THOUSANDS_SPACED = re.compile(r"(?<![\d.,])\d{1,3}(?:(?:\\[,;: ]|~|[ \u00a0\u202f\u2009])\d{3})+(?![\d])")
_THOUSANDS_COMMA = re.compile(r"(?<![\d.,])[1-9]\d{0,2}(?:,\d{3})+(?![\d,])")
_THOUSANDS_POINT = re.compile(r"(?<![\d.,])[1-9]\d{0,2}(?:\.\d{3})+(?![\d.])")
_DECIMAL_COMMA = re.compile(r"(?<=\d),(?=\d)")
# A tuple or interval written with one comma and no space, `(0,5)`, `[1,2)`, `\{0,5\}`: not a decimal.
_BRACKETED_PAIR = re.compile(r"^(?:[(\[]|\\\{)\s*-?\d+,-?\d+\s*(?:[)\]]|\\\})$")
# French open intervals: ]0 ; 5[ is (0, 5), [0 ; 5[ is [0, 5).
_FRENCH_INTERVAL = re.compile(r"^([\[\]])\s*([^;\[\]]+?)\s*;\s*([^;\[\]]+?)\s*([\[\]])$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|~")
# A number (or a/b) followed only by words (a unit, a currency, a noun in any script): `18 ドル`, `3/4 de la pizza`.
_NUMBER_THEN_WORDS = re.compile(
    r"^(?P<number>[-+]?(?:\d+(?:[.,]\d+)?(?:\s*/\s*\d+)?|\.\d+))\s*(?P<words>(?:[^\W\d_]|[\s/.²³°$€£¥^-])+)$"
)
_CURRENCY = re.compile(r"^(?:\\\$|\$|€|£|¥|US\$)\s*|\s*(?:\\\$|\$|€|£|¥|円|元)$")


def _french_interval(answer: str) -> str:
    match = _FRENCH_INTERVAL.match(answer)
    if not match:
        return answer
    left, low, high, right = match.groups()
    return f"{'(' if left == ']' else '['}{low}, {high}{')' if right == '[' else ']'}"


def _decimal_comma_readings(answer: str) -> list[str]:
    """Readings of an answer written with decimal commas; an ambiguous `1,000` or `1.000` gives both readings."""
    if ";" in answer:  # 1,5 ; 2,5: the semicolon separates, so every comma between digits is a decimal one
        return [_DECIMAL_COMMA.sub(".", answer).replace(";", ",")]
    if _BRACKETED_PAIR.match(answer):
        return [answer]
    readings = []
    if _THOUSANDS_COMMA.fullmatch(answer):
        readings.append(answer.replace(",", ""))
    if _THOUSANDS_POINT.fullmatch(answer) and answer.count(".") > 1:
        return [answer.replace(".", "")]
    if _THOUSANDS_POINT.fullmatch(answer):
        readings += [answer, answer.replace(".", "")]
    readings.append(_DECIMAL_COMMA.sub(".", answer))
    return list(dict.fromkeys(readings))


def _strip_words_after_number(answer: str) -> str | None:
    """`18 ドル` -> `18`, `12 euros` -> `12`; None when the answer is not a number followed by words.

    A single Latin letter is kept (`5x`, `3 m` could be algebra); math-verify already drops the units it knows.
    """
    plain = _TEXT_WRAPPER.sub(r" \1 ", answer)
    plain = _SPACING.sub(" ", plain).strip()
    match = _NUMBER_THEN_WORDS.match(plain)
    if not match:
        return None
    words = match["words"]
    latin_only = all(char.isascii() or not char.isalpha() for char in words) and re.search(r"[A-Za-z]", words)
    if latin_only and not re.search(r"[A-Za-z]{2}", words):
        return None
    return match["number"]


def math_readings(answer: str, lang: str) -> list[str]:
    """The strings an answer may mean, most likely first, each ready for math-verify."""
    answer = to_half_width(answer).strip().strip("$").strip()
    answer = _CURRENCY.sub("", answer)
    answer = _french_interval(answer)
    answer = _THOUSANDS_SPACED.sub(lambda m: re.sub(r"\D", "", m.group()), answer)
    percent = bool(_PERCENT.search(answer))
    answer = _PERCENT.sub("", answer).replace("°", "^{\\circ}")
    readings = _decimal_comma_readings(answer) if lang in DECIMAL_COMMA_LANGUAGES else [answer]
    stripped = [s for s in (_strip_words_after_number(r) for r in readings) if s is not None]
    if lang in DECIMAL_COMMA_LANGUAGES:
        stripped = [_DECIMAL_COMMA.sub(".", s) for s in stripped]
    readings += stripped
    if percent:  # 50% may be meant as 50 or as 0.5
        readings += [f"\\frac{{{r}}}{{100}}" for r in readings]
    return list(dict.fromkeys(r for r in readings if r))


def _timeouts_available() -> bool:
    return threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=4096)
def _parse(expression: str, timeout_s: int | None) -> tuple:
    """math-verify's parse of one answer reading, boxed so that the whole reading is the answer."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return tuple(
        parse(
            f"\\boxed{{{expression}}}",
            [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
            parsing_timeout=timeout_s,
        )
    )


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, lang: str, timeout_s: int | None) -> tuple[tuple, ...]:
    """Every reading of a gold answer, parsed once: 32 samples of a problem share one gold."""
    parsed = (_parse(reading, timeout_s) for reading in math_readings(gold, lang))
    return tuple(p for p in parsed if p)


_INTEGER = re.compile(r"[-+]?\d+")


@lru_cache(maxsize=65536)
def math_equal(gold: str, prediction: str, lang: str = "en", timeout_s: int | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether `prediction` means the same as `gold` (math-verify; sets, intervals, units and percents allowed).

    Results are cached: the samples of one problem repeat the same few answers.
    """
    return prediction.strip() == gold.strip() or math_equivalent(gold, prediction, lang, timeout_s)


def math_equivalent(gold: str, prediction: str, lang: str = "en", timeout_s: int | None = DEFAULT_TIMEOUT_S) -> bool:
    """`math_equal` without its shortcut for identical strings: what math-verify makes of every reading."""
    if not _timeouts_available():
        timeout_s = None
    from math_verify import verify

    gold_readings = math_readings(gold, lang)
    gold_integers = {int(g) for g in gold_readings if _INTEGER.fullmatch(g)}
    gold_parses = None
    for reading in math_readings(prediction, lang):
        if _INTEGER.fullmatch(reading) and len(gold_integers) == len(gold_readings):
            # Plain integers on both sides: sympy would only confirm integer equality, at a millisecond a call.
            if int(reading) in gold_integers:
                return True
            continue
        parsed = _parse(reading, timeout_s)
        if not parsed:
            continue
        gold_parses = gold_parses if gold_parses is not None else _parse_gold(gold, lang, timeout_s)
        for gold_parsed in gold_parses:
            if verify(list(gold_parsed), list(parsed), timeout_seconds=timeout_s, allow_set_relation_comp=True):
                return True
    return False


def check_math(
    text: str, gold: str, *, lang: str = "en", timeout_s: int | None = DEFAULT_TIMEOUT_S, **_
) -> AnswerCheck:
    region = answer_region(text)
    boxed = [b for b in boxed_contents(region) if b]
    extracted = boxed[-1] if boxed else answer_phrase_snippet(region)
    if extracted is None:
        return AnswerCheck(None, False, NO_ANSWER)
    if math_equal(gold, extracted, lang, timeout_s):
        return AnswerCheck(extracted, True, MATCHES)
    return AnswerCheck(extracted, False, NO_MATCH)


# --- choice answers ------------------------------------------------------------------------------------------------

_LETTER_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_OPTION_WORD = re.compile(r"^(?:option|choice|answer|opción|opcion|réponse|respuesta|選択肢|答え)\s*[:：]?\s*", re.I)
# One letter as models write it: B, (B), B), [B], **B**, B., B: text, B) text.
_LEADING_LETTER = re.compile(r"^[*_\s]*[(\[]?\s*([A-Z])\s*[)\]]?[*_]*(?![A-Za-z])(?:\s*[:.)\-]|\s|$)")
_LETTER_LIST = re.compile(r"^[\s()\[\],;/&、・*]*(?:[A-Z](?:[\s()\[\],;/&、・*]|\b(?:and|or|et|ou|y|o)\b|と|か)*)+$")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])[A-Z](?![A-Za-z])")


_LOWERCASE_LETTER = re.compile(r"[(\[]?[a-j][)\]]?")


def _clean_choice_answer(answer: str) -> str:
    answer = to_half_width(answer).strip().strip("$").strip()
    answer = _OPTION_WORD.sub("", _LETTER_WRAPPER.sub(r"\1", answer)).strip()
    # `(b)` alone is a letter too; a lowercase letter inside text is not.
    return answer.upper() if _LOWERCASE_LETTER.fullmatch(answer) else answer


def choice_letters(answer: str, choices: Mapping[str, str]) -> list[str]:
    """The distinct letters an answer names, in order: one for a clear answer, several for a hedge, none if unclear.

    `B`, `(B)`, `B: text` name B; `A, C` or `A and C` name A and C; the exact text of an option names its letter.
    """
    answer = _clean_choice_answer(answer)
    if _LETTER_LIST.match(answer):
        return list(dict.fromkeys(_STANDALONE_LETTER.findall(answer)))
    leading = _LEADING_LETTER.match(answer)
    if leading:
        return [leading[1]]
    by_text = [letter for letter, option in choices.items() if option.strip().casefold() == answer.casefold()]
    return by_text[:1]


def _last_line_letter(region: str) -> str | None:
    """A bare letter on the last line of the answer ("**B**", "(B)"), the form models use without a phrase."""
    lines = [line for line in region.strip().splitlines() if line.strip()]
    if not lines:
        return None
    line = _clean_choice_answer(lines[-1])
    return line if re.fullmatch(r"[*_\s]*[(\[]?\s*[A-Z]\s*[)\]]?[*_.\s]*", line) else None


def check_choice(text: str, gold: str, *, choices: Mapping[str, str] | None = None, **_) -> AnswerCheck:
    choices = choices or {}
    region = answer_region(text)
    boxed = [b for b in boxed_contents(region) if b]
    if boxed:
        named = [letter for box in boxed for letter in choice_letters(box, choices)]
        # Every box of the final answer counts: boxing A and then C is a hedge, not an answer.
        if len(set(named)) > 1:
            return AnswerCheck(", ".join(dict.fromkeys(named)), False, SEVERAL_LETTERS)
        extracted = named[0] if named else boxed[-1]
    else:
        snippet = answer_phrase_snippet(region) or _last_line_letter(region)
        if snippet is None:
            return AnswerCheck(None, False, NO_ANSWER)
        named = choice_letters(snippet, choices)
        if len(named) > 1:
            return AnswerCheck(", ".join(named), False, SEVERAL_LETTERS)
        extracted = named[0] if named else snippet
    if choices and extracted not in choices:
        return AnswerCheck(extracted, False, NOT_A_CHOICE)
    correct = extracted == to_half_width(gold).strip()
    return AnswerCheck(extracted, correct, MATCHES if correct else NO_MATCH)


AnswerChecker = Callable[..., AnswerCheck]
CHECKERS: dict[str, AnswerChecker] = {"math": check_math, "choice": check_choice}


def check_answer(
    text: str,
    gold: str,
    answer_type: str = "math",
    *,
    choices: Mapping[str, str] | None = None,
    lang: str = "en",
    timeout_s: int | None = DEFAULT_TIMEOUT_S,
) -> AnswerCheck:
    """Judge a completion's final answer against `gold` (`answer_type` is `math` or `choice`).

    `timeout_s` bounds math-verify's parsing and comparison; it is ignored (None) outside the main thread,
    where `signal.alarm` cannot be used.
    """
    try:
        checker = CHECKERS[answer_type]
    except KeyError:
        raise ValueError(f"unknown answer type {answer_type!r}; known: {', '.join(CHECKERS)}") from None
    return checker(text, gold, choices=choices, lang=lang, timeout_s=timeout_s)
