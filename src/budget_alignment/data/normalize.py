"""Stage `normalize`: what training and evaluation read, one file per dataset and language (English included);
`normalize@{dataset}` names a dataset's part of the stage in messages and reports.

Every record is always cleaned: Unicode NFC, CRLF and CR to LF, no trailing blanks on a line, at most two blank
lines in a row (`clean_text`). Then the blog's "Lightweight fixes" apply as named rules, each switched per language
(`normalize.<lang>.<rule>`; the paper profile, the recipe as measured, leaves them all off).

Each rule is a function `(text, lang) -> text` registered under the name of its switch in `normalize.<lang>`
(params.py `NormalizeLangParams`), applied in registration order to the question, the choice texts and the solution
(never to code, never to choice letters). Gold answers come from English, so only the width rules, which cannot
change a value, touch them; a math answer like `-2,1` is a list, not a decimal. Every rule is idempotent:
normalizing twice changes nothing.

Units table (`consistent_units`, Japanese, only right after a number; the number and the symbol are written
together, as Japanese texts write `3cm`):

    キロメートル ｋｍ ㎞ -> km    センチメートル ｃｍ ㎝ -> cm    ミリメートル ｍｍ ㎜ -> mm    メートル ｍ -> m
    キログラム ｋｇ ㎏ -> kg      グラム ｇ -> g                 ミリグラム ｍｇ ㎎ -> mg
    リットル Ｌ ℓ -> L           ミリリットル ｍＬ ｍｌ ㎖ -> mL
    平方キロメートル -> km²       平方メートル ㎡ -> m²          平方センチメートル ㎠ -> cm²
    立方メートル ㎥ -> m³         立方センチメートル ㎤ -> cm³
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from budget_alignment import paths
from budget_alignment.data import contracts
from budget_alignment.data.quarantine import LanguageResult, deliver
from budget_alignment.errors import StageError
from budget_alignment.params import NormalizeLangParams, Params
from budget_alignment.records import Problem, RecordError, read_records

if TYPE_CHECKING:
    from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)


class NormalizeError(StageError, RuntimeError):
    """The stage cannot run: a missing input or a language without rules in params."""


@dataclass(frozen=True)
class Rule:
    name: str
    apply: Callable[[str, str], str]
    # Also applied to a math gold answer (only rules that cannot change its value).
    on_answer: bool


RULES: dict[str, Rule] = {}


def rule(name: str, *, on_answer: bool = False) -> Callable[[Callable[[str, str], str]], Callable[[str, str], str]]:
    if name not in NormalizeLangParams.model_fields:
        raise ValueError(f"rule {name!r} has no switch in NormalizeLangParams")

    def register(function: Callable[[str, str], str]) -> Callable[[str, str], str]:
        RULES[name] = Rule(name, function, on_answer)
        return function

    return register


# Languages that write 0,5 for one half (and so separate thousands with spaces, or dots in Spain, never commas).
DECIMAL_COMMA_LANGUAGES = frozenset({"fr", "es", "de", "it", "pt", "ru", "pl", "nl", "tr", "id", "vi"})

# Code is never normalized: ``` blocks, `inline code`, [asy] figures.
_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]+`|\[asy\].*?(?:\[/asy\]|\Z)", re.DOTALL)
_MATH = re.compile(r"\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)|(?<!\\)\$(?:[^$\\]|\\.)+?(?<!\\)\$", re.DOTALL)


def _outside(pattern: re.Pattern[str], text: str, function: Callable[[str], str]) -> str:
    """Apply `function` to the parts of `text` that `pattern` does not match."""
    pieces, last = [], 0
    for match in pattern.finditer(text):
        pieces.append(function(text[last : match.start()]))
        pieces.append(match.group())
        last = match.end()
    pieces.append(function(text[last:]))
    return "".join(pieces)


# --- always: Unicode and whitespace -------------------------------------------------------------------------------

_TRAILING_BLANKS = re.compile(r"[ \t]+(?=\n|\Z)")
# A blank inside a line, for the unit rule and the Japanese spacing rule: one class, so the unit rule never skips a
# blank that the spacing rule drops (normalizing twice would then differ from once).
_BLANK = "[ \t\u00a0\u3000]"
_BLANK_LINES = re.compile(r"\n{4,}")


def clean_text(text: str) -> str:
    """NFC, LF line ends, no trailing blanks on a line, at most two blank lines in a row. Idempotent."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return _BLANK_LINES.sub("\n\n\n", _TRAILING_BLANKS.sub("", text))


# --- width ---------------------------------------------------------------------------------------------------------

_FULLWIDTH_DIGITS = str.maketrans("０１２３４５６７８９", "0123456789")
_FULLWIDTH_OPERATORS = str.maketrans(
    {"＋": "+", "－": "-", "−": "-", "＝": "=", "＜": "<", "＞": ">", "／": "/", "＊": "*", "＾": "^", "％": "%"}
)
_FULLWIDTH_DECIMAL_POINT = re.compile(r"(?<=\d)．(?=\d)")
# Full-width brackets around ASCII math, e.g. （3+4）; Japanese prose in brackets （注） keeps them.
_FULLWIDTH_MATH_BRACKETS = re.compile(r"（([0-9A-Za-z+\-*/^=<>.,%\s]+)）")


@rule("halfwidth_digits", on_answer=True)
def halfwidth_digits(text: str, lang: str) -> str:
    """０-９ -> 0-9 and a full-width decimal point between digits -> `.`."""
    return _FULLWIDTH_DECIMAL_POINT.sub(".", text.translate(_FULLWIDTH_DIGITS))


@rule("halfwidth_operators", on_answer=True)
def halfwidth_operators(text: str, lang: str) -> str:
    """＋ － − ＝ ＜ ＞ ／ ＊ ＾ ％ -> ASCII, and full-width brackets around ASCII math -> ( )."""
    text = text.translate(_FULLWIDTH_OPERATORS)
    return _FULLWIDTH_MATH_BRACKETS.sub(r"(\1)", text)


# --- thousand separators and decimal commas ------------------------------------------------------------------------

# 1,000 and 12,345,678 (also １，０００ and LaTeX's 10,\!000 and 1{,}000), not 1,2 or a list like 1,000,5.
_COMMA_THOUSANDS = re.compile(r"(?<![\d.,，])\d{1,3}(?:(?:,\\!|\{,\}|[,，])\d{3})+(?!\d|[,，]\d)")
# 80 000 with a space, a no-break space, a narrow no-break or thin space, or LaTeX's \, \  and ~.
_SPACE_THOUSANDS = re.compile(
    r"(?<![\d.,])\d{1,3}(?:(?:[ \u00a0\u202f\u2009~]|\\,|\\ )\d{3})+(?!\d|,\d{3}|[ \u00a0\u202f\u2009]\d)"
)
# 1.000.000 (two groups or more: a decimal has one point at most).
_DOT_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:\.\d{3}){2,}(?![\d.]|,\d)")
_SEPARATORS = re.compile(r",\\!|\{,\}|\\,|\\ |[,，. \u00a0\u202f\u2009~]")


def _drop_separators(match: re.Match[str]) -> str:
    return _SEPARATORS.sub("", match.group())


@rule("strip_thousand_separators")
def strip_thousand_separators(text: str, lang: str) -> str:
    """No thousand separators: 1,000 -> 1000 (English style), 80 000 and 1.000.000 -> digits (decimal-comma style)."""
    if lang in DECIMAL_COMMA_LANGUAGES:
        text = _DOT_THOUSANDS.sub(_drop_separators, text)
        return _SPACE_THOUSANDS.sub(_drop_separators, text)
    return _COMMA_THOUSANDS.sub(_drop_separators, text)


# A decimal comma in prose: 0,5 or 19,50, not part of a chain like 1,2,3 and never followed by a space (1, 2).
_PROSE_DECIMAL = re.compile(r"(?<![\d.,])(\d+),(\d+)(?!\d|[.,]\d)")
_LATEX_DECIMAL = re.compile(r"(\d)\{,\}(\d)")
_ANY_COMMA = re.compile(r",")


def _unambiguous_decimal(match: re.Match[str]) -> str:
    whole, fraction = match.group(1), match.group(2)
    # 1,234 could be English thousands left in the text; 0,125 and 3,14 cannot.
    if len(fraction) == 3 and whole != "0":
        return match.group()
    return f"{whole}.{fraction}"


def _math_decimal(span: str) -> str:
    span = _LATEX_DECIMAL.sub(r"\1.\2", span)
    # In math, a comma separates coordinates, arguments and list items: only a lone comma at bracket depth 0,
    # between digits, is a decimal comma ($x = 0,5$; not $(1,2)$, $f(0,5)$ or $1,2,3$).
    commas = [m.start() for m in _ANY_COMMA.finditer(span)]
    if len(commas) != 1:
        return span
    position = commas[0]
    depth = 0
    for char in span[:position]:
        depth += char in "([{"
        depth -= char in ")]}"
    if depth != 0:
        return span
    return _PROSE_DECIMAL.sub(_unambiguous_decimal, span)


@rule("decimal_comma")
def decimal_comma(text: str, lang: str) -> str:
    """0,5 -> 0.5 where that is unambiguous, so numbers read (and answers verify) the same in every language."""

    def prose(part: str) -> str:
        return _PROSE_DECIMAL.sub(_unambiguous_decimal, part)

    pieces, last = [], 0
    for match in _MATH.finditer(text):
        pieces.append(prose(text[last : match.start()]))
        pieces.append(_math_decimal(match.group()))
        last = match.end()
    pieces.append(prose(text[last:]))
    return "".join(pieces)


# --- units ---------------------------------------------------------------------------------------------------------

UNITS = {
    "平方キロメートル": "km²",
    "平方センチメートル": "cm²",
    "平方メートル": "m²",
    "立方センチメートル": "cm³",
    "立方メートル": "m³",
    "キロメートル": "km",
    "センチメートル": "cm",
    "ミリメートル": "mm",
    "メートル": "m",
    "キログラム": "kg",
    "ミリグラム": "mg",
    "グラム": "g",
    "ミリリットル": "mL",
    "リットル": "L",
    "ｋｍ": "km",
    "ｃｍ": "cm",
    "ｍｍ": "mm",
    "ｋｇ": "kg",
    "ｍｇ": "mg",
    "ｍＬ": "mL",
    "ｍｌ": "mL",
    "ｍ": "m",
    "ｇ": "g",
    "Ｌ": "L",
    "ℓ": "L",
    "㎞": "km",
    "㎝": "cm",
    "㎜": "mm",
    "㎏": "kg",
    "㎎": "mg",
    "㎖": "mL",
    "㎡": "m²",
    "㎠": "cm²",
    "㎥": "m³",
    "㎤": "cm³",
}
# Longest names first, so センチメートル is not read as センチ + メートル; only right after a number.
_UNIT_NAMES = "|".join(map(re.escape, sorted(UNITS, key=len, reverse=True)))
_UNIT = re.compile(rf"(?<=[\d０-９]){_BLANK}*({_UNIT_NAMES})")


@rule("consistent_units")
def consistent_units(text: str, lang: str) -> str:
    """Japanese unit names and full-width unit symbols after a number -> SI symbols (the table above)."""
    return _UNIT.sub(lambda m: UNITS[m.group(1)], text)


# --- Spanish math notation -----------------------------------------------------------------------------------------

_GCD = re.compile(r"(?<![\w.])(?:m\.c\.d\.|M\.C\.D\.|mcd|MCD)(?!\w)")
_LCM = re.compile(r"(?<![\w.])(?:m\.c\.m\.|M\.C\.M\.|mcm|MCM)(?!\w)")
# "módulo" as the operation: followed by math, a number or a one-letter variable ("módulo $p$", "módulo 7",
# "módulo n"), not the algebraic structure ("un módulo sobre $R$").
_MODULO = re.compile(r"(?<!\w)[Mm][oó]dulo(?=\s*(?:\$|\\\(|\d|[A-Za-z](?![\w])))")


@rule("spanish_math_notation")
def spanish_math_notation(text: str, lang: str) -> str:
    """mcd / m.c.d. -> gcd, mcm / m.c.m. -> lcm, módulo (the operation) -> mod."""
    text = _GCD.sub("gcd", text)
    text = _LCM.sub("lcm", text)
    return _MODULO.sub("mod", text)


# --- tokenizer-aware spacing ---------------------------------------------------------------------------------------

# Byte-level BPE vocabularies that split numbers into digits (SmolLM2's, Qwen2's) make a blank before a digit a token
# of its own: "3 + 4" is 4 tokens and "3+4" 3, "12 個" 5 and "12個" 4 (tests/test_normalize.py counts them on the
# tiny tokenizer, benchmarks/numeral_spacing.py on SmolLM2's).
SPACELESS_LANGUAGES = frozenset({"ja", "zh"})
# Kana, CJK ideographs, CJK punctuation (not the ideographic space) and full-width forms.
_CJK = "\u3001-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff01-\uff60"
# Stands for a math span while the blanks around it are adjusted (a private-use character real text does not hold).
_FORMULA = "\ue000"
_SPACED_OPERATOR = re.compile(r"(?<=\d)[ \t\u00a0]*([+\-*/=<>×÷^])[ \t\u00a0]*(?=\d)")
# A numeral, a formula or a LaTeX command (`\boxed{15}`) next to Japanese text, blanks between.
_BLANKS_AFTER_CJK = re.compile(rf"(?<=[{_CJK}]){_BLANK}+(?=[\d\\{_FORMULA}])")
_BLANKS_BEFORE_CJK = re.compile(rf"(?<=[\d}}{_FORMULA}]){_BLANK}+(?=[{_CJK}])")


@rule("compact_numeral_spacing")
def compact_numeral_spacing(text: str, lang: str) -> str:
    """No blanks around an operator between numerals (`3 + 4 = 7` -> `3+4=7`, every language) nor, in Japanese and
    Chinese, between text and a numeral, a formula or `\\boxed{}` (`は \\boxed{15} です` -> `は\\boxed{15}です`).

    Inside math (`$...$`, `\\(...\\)`, display math) nothing changes: those spans are kept byte for byte.
    """
    if _FORMULA in text:
        return text
    formulas: list[str] = []

    def hide(match: re.Match[str]) -> str:
        formulas.append(match.group())
        return _FORMULA

    text = _SPACED_OPERATOR.sub(r"\1", _MATH.sub(hide, text))
    if lang in SPACELESS_LANGUAGES:
        text = _BLANKS_BEFORE_CJK.sub("", _BLANKS_AFTER_CJK.sub("", text))
    restored = iter(formulas)
    return re.sub(_FORMULA, lambda _: next(restored), text)


# --- applying rules ------------------------------------------------------------------------------------------------


def enabled_rules(settings: NormalizeLangParams) -> list[str]:
    return [name for name in RULES if getattr(settings, name)]


def normalize_text(text: str, lang: str, rules: Sequence[str]) -> str:
    for name in rules:
        text = _outside(_CODE, text, lambda part, name=name: RULES[name].apply(part, lang))
    return text


def normalize_field(text: str, lang: str, rules: Sequence[str]) -> str:
    """A text cleaned, then with the rules applied, then cleaned again (a rule may leave, say, a letter beside a
    combining accent that NFC joins)."""
    return clean_text(normalize_text(clean_text(text), lang, rules))


def normalize_problem(problem: Problem, rules: Sequence[str]) -> Problem:
    """The record cleaned (always), then with the rules applied; a math gold answer gets only the width rules."""
    lang = problem.lang

    def text(value: str) -> str:
        return normalize_field(value, lang, rules)

    answer = unicodedata.normalize("NFC", problem.answer)
    if problem.answer_type == "math":
        answer = normalize_text(answer, lang, [name for name in rules if RULES[name].on_answer])
    choices = None
    if problem.choices is not None:
        choices = {letter: text(value) for letter, value in problem.choices.items()}
    return problem.model_copy(
        update={
            "question": text(problem.question),
            "answer": answer,
            "choices": choices,
            "solution": text(problem.solution) if problem.solution else problem.solution,
            "provenance": {**problem.provenance, "normalize": {"lang": lang, "rules": list(rules)}},
        }
    )


def rule_counts(problems: Sequence[Problem], rules: Sequence[str]) -> dict[str, int]:
    """How many records the cleaning changes, and each rule after it (applied alone), for the stage's metrics."""
    cleaned = [normalize_problem(p, []).model_dump(exclude={"provenance"}) for p in problems]
    counts = {
        "cleanup": sum(c != p.model_dump(exclude={"provenance"}) for c, p in zip(cleaned, problems, strict=True))
    }
    for name in rules:
        counts[name] = sum(
            normalize_problem(p, [name]).model_dump(exclude={"provenance"}) != c
            for c, p in zip(cleaned, problems, strict=True)
        )
    return counts


def normalize_dataset(
    params: Params, dataset: str, run: StageRun | None = None, *, langs: Sequence[str] | None = None
) -> dict[str, list[Problem]]:
    """Dataset `dataset` of stage `normalize`: each language's accepted records to `paths.normalized(dataset, lang)`.

    English reads the ingested records, other languages their translation: only what those stages accepted. Each is
    checked against English.
    """
    stage = f"normalize@{dataset}"
    langs = list(langs) if langs else list(params.normalize)
    for lang in langs:
        if lang not in params.normalize:
            raise NormalizeError(f"normalize has no entry for {lang!r}")
    try:
        english = read_records(paths.ingested(dataset), Problem)
        inputs = {
            lang: english if lang == "en" else read_records(paths.translated(dataset, lang), Problem) for lang in langs
        }
    except FileNotFoundError as error:
        stage_before = "ingest" if error.filename == str(paths.ingested(dataset)) else "translate"
        raise NormalizeError(
            f"{error.filename} does not exist: run `budget-align {stage_before} {dataset}` first"
        ) from None
    except RecordError as error:
        raise NormalizeError(str(error)) from None
    english_ids = {problem.id for problem in english}
    results = []
    for lang, records in inputs.items():
        rules = enabled_rules(params.normalize[lang])
        normalized = [normalize_problem(problem, rules) for problem in records]
        counts = rule_counts(records, rules)
        log.info(
            "%s-%s: %d records; %s",
            stage,
            lang,
            len(normalized),
            ", ".join(f"{k} ({v} changed)" for k, v in counts.items()),
        )
        contract = contracts.check_normalized(
            normalized,
            english,
            lang=lang,
            rules=rules,
            stage=stage,
            expected_ids=[problem.id for problem in records if problem.id in english_ids],
            max_rejected_fraction=params.contracts.max_rejected_fraction.normalize,
            run=run,
        )
        metrics = {f"changed.{name}": count for name, count in counts.items()}
        results.append(LanguageResult(lang, normalized, contract, [paths.normalized(dataset, lang)], metrics=metrics))
    return deliver(stage, results, run)
