"""Language consistency: a table of cases (tests/cases/language.yaml), the pieces of the judgement, real text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from budget_alignment.params import LanguageCheckParams
from budget_alignment.scoring.language import (
    FUNCTION_WORDS,
    LanguageJudge,
    LanguageVerdict,
    distinctive_words,
    function_word_vote,
    judge_language,
    script_of,
    segments,
    split_spans,
    strip_non_language,
    supported_languages,
)

CASES = yaml.safe_load((Path(__file__).parent / "cases" / "language.yaml").read_text(encoding="utf-8"))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def judge() -> LanguageJudge:
    return LanguageJudge()


def test_the_table_is_large_and_covers_every_language() -> None:
    assert len(CASES) >= 40
    assert {case["lang"] for case in CASES} >= {"ja", "fr", "es", "en", "zh"}
    assert len({case["id"] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_language_case(case: dict, judge: LanguageJudge) -> None:
    verdict = judge.judge(case["text"], case["lang"])
    assert (verdict.think_in_lang, verdict.answer_in_lang) == (case["think"], case["answer"]), verdict
    assert verdict.following is (case["think"] and case["answer"])
    assert 0.0 <= verdict.think_share <= 1.0


# --- other languages: script checks and lingua among same-script candidates ----------------------------------------

OTHER_LANGUAGES = [
    (
        "de",
        "Wir berechnen zuerst die Summe der beiden Zahlen und teilen sie dann durch zwei, um den Mittelwert zu sehen.",
    ),
    ("it", "Prima calcoliamo la somma dei due numeri e poi la dividiamo per due per ottenere la media finale."),
    ("pt", "Primeiro calculamos a soma dos dois números e depois dividimos por dois para obter a média final."),
    ("ru", "Сначала найдём сумму двух чисел, а затем разделим её на два, чтобы получить среднее значение."),
    ("ko", "먼저 두 수의 합을 구한 다음, 그 합을 둘로 나누어 평균을 구합니다. 계산 결과를 다시 확인합니다."),
    ("ar", "أولاً نحسب مجموع العددين ثم نقسمه على اثنين للحصول على المتوسط الحسابي للعددين."),
    ("th", "ก่อนอื่นเราหาผลรวมของตัวเลขทั้งสองแล้วหารด้วยสองเพื่อหาค่าเฉลี่ยของตัวเลขทั้งสอง"),
    ("hi", "पहले हम दोनों संख्याओं का योग निकालते हैं और फिर औसत पाने के लिए उसे दो से भाग देते हैं।"),
    (
        "el",
        "Πρώτα υπολογίζουμε το άθροισμα των δύο αριθμών και μετά το διαιρούμε με το δύο για να βρούμε τον μέσο όρο.",
    ),
]


@pytest.mark.parametrize(("lang", "text"), OTHER_LANGUAGES, ids=[lang for lang, _ in OTHER_LANGUAGES])
def test_other_languages_are_judged_in_their_language_and_not_in_another(lang: str, text: str) -> None:
    # Latin-script languages are only told apart from the candidates: German needs German among them.
    judge = LanguageJudge(LanguageCheckParams(candidates=["en", "fr", "es", "de", "it", "pt"]))
    assert judge.judge_span(text, lang).in_lang
    assert not judge.judge_span(text, "fr").in_lang
    assert not judge.judge_span(text, "ja").in_lang


def test_every_lingua_language_can_be_asked_for(judge: LanguageJudge) -> None:
    for lang in sorted(supported_languages()):
        # Too short to judge, so no lingua model is loaded; what matters is that every code has a rule.
        assert judge.judge("<think>42</think>ok", lang) == LanguageVerdict(True, True, 1.0, 1.0)
        assert script_of(lang)


@pytest.mark.parametrize("code", ["xx", "jp", "EN", ""])
def test_an_unsupported_language_is_a_clear_error(code: str) -> None:
    with pytest.raises(ValueError, match=f"language {code!r} is not supported"):
        judge_language("<think>Bonjour tout le monde.</think>", code)


def test_an_unsupported_candidate_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'xx' is not supported"):
        LanguageJudge(LanguageCheckParams(candidates=["en", "xx"]))


# --- the pieces ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>reason</think>answer", ("reason", "answer", True)),
        ("  <think>reason</think>", ("reason", "", True)),
        ("reason without an opening tag</think>answer", ("reason without an opening tag", "answer", True)),
        ("<think>cut off before the end", ("cut off before the end", "", False)),
        ("<think>a</think>b</think>c", ("a", "b</think>c", True)),
        ("", ("", "", False)),
    ],
)
def test_split_spans(text: str, expected: tuple[str, str, bool]) -> None:
    assert split_spans(text) == expected


@pytest.mark.parametrize(
    ("text", "kept", "removed"),
    [
        ("Soit $x^2 + y$ la somme.", ["Soit", "la somme"], ["x^2", "y"]),
        ("On a $$\\int_0^1 f$$ puis \\(g\\) et \\[h\\].", ["On", "puis", "et"], ["int", " f", "g", "h"]),
        ("Voir https://example.org/page et www.example.com ici", ["Voir", "et", "ici"], ["example"]),
        ("Code ```python\nprint('hello world')\n``` et `total_cost` fin", ["Code", "et", "fin"], ["print", "hello"]),
        (
            "La variable total_cost vaut 12,5 et n_items vaut 3.",
            ["La variable", "vaut", "et"],
            ["total", "12", "items"],
        ),
        ("Le triangle ABC et le point P.", ["Le triangle", "et le point"], ["ABC", " P"]),
        ("La réponse \\boxed{\\frac{1}{2}} et \\textbf{Réponse}", ["La réponse", "Réponse"], ["frac", "boxed"]),
        ("xの値は３です", ["xの値は"], []),
        ("l'équation déjà vue", ["l'équation", "déjà"], []),
    ],
)
def test_strip_non_language(text: str, kept: list[str], removed: list[str]) -> None:
    stripped = strip_non_language(text)
    for words in kept:
        assert words in stripped, stripped
    for words in removed:
        assert words not in stripped, stripped


def test_short_sentences_are_merged_until_long_enough() -> None:
    parts = segments("Un. Deux. Trois quatre cinq six. Sept huit neuf dix onze. Fin.", 20)
    assert [part.letters for part in parts] == [24, 22]
    assert parts[0].text == "Un Deux Trois quatre cinq six"
    assert parts[1].words == ["Sept", "huit", "neuf", "dix", "onze", "Fin"]
    # A short tail joins the segment before it, so no segment is left below the minimum unless it is alone.
    assert [part.letters for part in segments("Bonjour tout le monde. Fin.", 20)] == [21]
    assert [part.letters for part in segments("Court.", 20)] == [5]


def test_function_word_vote_decides_plain_text_and_leaves_mixed_text_to_lingua() -> None:
    vocabulary = distinctive_words(frozenset({"en", "fr", "es"}))
    assert vocabulary is not None
    assert "que" not in vocabulary  # French and Spanish share it: evidence for neither
    vote = lambda text: function_word_vote(text.split(), vocabulary)  # noqa: E731
    assert vote("nous avons donc une solution pour cette équation") == "fr"
    assert vote("los números del problema son enteros y por eso") == "es"
    assert vote("the value of this sum is what we need") == "en"
    assert vote("nous avons the value") is None
    assert vote("solution") is None
    # A language without a word list makes the vote abstain entirely.
    assert distinctive_words(frozenset({"en", "fr", "nl"})) is None
    assert set(FUNCTION_WORDS) >= {"en", "fr", "es", "de", "it", "pt"}


def test_share_is_graded_for_the_reward(judge: LanguageJudge) -> None:
    french = "Nous cherchons la valeur de la somme des deux nombres donnés dans cet énoncé. " * 3
    english = "We now look for the value of the sum of the two numbers given in the statement. " * 3
    half = judge.judge(f"<think>{french}{english}</think>", "fr")
    assert 0.3 < half.think_share < 0.7
    assert not half.think_in_lang
    assert judge.judge(f"<think>{french}</think>", "fr").think_share == 1.0
    assert judge.judge(f"<think>{english}</think>", "fr").think_share == 0.0


def test_thresholds_come_from_params() -> None:
    text = "<think>Nous calculons la somme. We then check the sum carefully once more.</think>"
    assert not LanguageJudge().judge(text, "fr").think_in_lang
    lenient = LanguageJudge(LanguageCheckParams(min_target_share=0.3, min_segment_letters=10))
    assert lenient.judge(text, "fr").think_in_lang
    too_short_to_judge = LanguageJudge(LanguageCheckParams(min_letters=500))
    assert too_short_to_judge.judge(text, "fr").think_in_lang


# --- real text: MGSM and PolyMath questions ------------------------------------------------------------------------


def _mgsm(lang: str) -> list[str]:
    path = DATA / "mgsm" / f"mgsm_{lang}.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return [line.split("\t")[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _polymath(lang: str) -> list[str]:
    folder = DATA / "polymath" / lang
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    return [
        json.loads(line)["question"]
        for level in ("low", "medium", "high", "top")
        for line in (folder / f"{level}.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


SOURCES = {"mgsm": _mgsm, "polymath": _polymath}
# Misses looked at one by one (PolyMath), all faults of the data rather than of the checker: the French file holds an
# untranslated English question, the Spanish file a Vietnamese one and a half-translated one ("... for all $x$,
# and ..."); one Japanese question ends with Asymptote code that lost its opening [asy] tag.


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("lang", ["ja", "fr", "es"])
def test_real_questions_are_in_their_language_and_english_ones_are_not(
    source: str, lang: str, judge: LanguageJudge
) -> None:
    questions, english = SOURCES[source](lang), SOURCES[source]("en")
    as_reasoning = [judge.judge(f"<think>{q}</think>", lang).think_in_lang for q in questions]
    as_answer = [judge.judge(f"<think></think>{q}", lang).answer_in_lang for q in questions]
    # An English question too short to judge would count as consistent: only judged ones are evidence.
    judged_english = [s for s in (judge.judge_span(q, lang) for q in english) if s.letters >= judge.params.min_letters]
    rejected = [not s.in_lang for s in judged_english]
    rates = [sum(flags) / len(flags) for flags in (as_reasoning, as_answer, rejected)]
    print(
        f"\n{source} {lang}: reasoning in {lang} {rates[0]:.1%}, answer in {lang} {rates[1]:.1%} "
        f"({len(questions)} questions); English rejected {rates[2]:.1%} ({len(rejected)} judged)"
    )
    assert min(rates) >= 0.95
