"""Language consistency: a table of cases (tests/cases/language.yaml), the pieces of the judgement, real text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from budget_alignment.languages import neighbours, same_script_languages, script_of, supported_languages
from budget_alignment.params import LanguageCheckParams
from budget_alignment.scoring.language import (
    FUNCTION_WORDS,
    SIMPLIFIED_ONLY,
    LanguageJudge,
    LanguageVerdict,
    count_letters,
    distinctive_words,
    function_word_hits,
    function_word_vote,
    identifier_candidates,
    judge_language,
    sentences,
    split_spans,
    strip_non_language,
)

CASES = yaml.safe_load((Path(__file__).parent / "cases" / "language.yaml").read_text(encoding="utf-8"))
FIXTURES = Path(__file__).parent / "fixtures" / "language"


@pytest.fixture(scope="module")
def judge() -> LanguageJudge:
    return LanguageJudge()


def test_the_table_is_large_and_covers_every_language() -> None:
    assert len(CASES) >= 70
    assert {case["lang"] for case in CASES} >= {"ja", "fr", "es", "en", "zh", "pt", "it", "de"}
    assert len({case["id"] for case in CASES}) == len(CASES)
    assert sum("think_share" in case for case in CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_language_case(case: dict, judge: LanguageJudge) -> None:
    verdict = judge.judge(case["text"], case["lang"])
    assert (verdict.think_in_lang, verdict.answer_in_lang) == (case["think"], case["answer"]), verdict
    assert verdict.following is (case["think"] and case["answer"])
    assert 0.0 <= verdict.think_share <= 1.0
    if "think_share" in case:
        assert verdict.think_share == pytest.approx(case["think_share"], abs=0.1), verdict


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
    judge = LanguageJudge()
    assert judge.judge_span(text, lang).in_lang
    assert not judge.judge_span(text, "fr").in_lang
    assert not judge.judge_span(text, "ja").in_lang


def test_every_lingua_language_can_be_asked_for_and_english_is_in_none_but_english(judge: LanguageJudge) -> None:
    english = "First we add the two numbers together, and then we divide the sum by two to find their average."
    judged = {lang: judge.judge(f"<think>{english}</think>{english}", lang) for lang in sorted(supported_languages())}
    assert {lang for lang, verdict in judged.items() if verdict.think_in_lang or verdict.answer_in_lang} == {"en"}
    assert all(verdict.think_share == 0.0 for lang, verdict in judged.items() if lang != "en")
    for lang in judged:  # too short to judge: left alone, whatever the language
        assert script_of(lang) and judge.judge("<think>42</think>ok", lang) == LanguageVerdict(True, True, 1.0, 1.0)


@pytest.mark.parametrize("code", ["xx", "jp", "EN", ""])
def test_an_unsupported_language_is_a_clear_error(code: str) -> None:
    with pytest.raises(ValueError, match=f"language {code!r} is not supported"):
        judge_language("<think>Bonjour tout le monde.</think>", code)


def test_candidates_are_the_measured_neighbours_or_every_language_of_the_script() -> None:
    assert identifier_candidates("es", "neighbours") == {"es", "en", "pt", "it", "fr", "sw"}
    assert identifier_candidates("fr", "neighbours") >= {"fr", "en", "es", "pt"}
    assert {"pt", "it", "ca", "fr", "en"} <= identifier_candidates("es", "script") == same_script_languages("es")
    assert len(identifier_candidates("es", "script")) > 40
    # Unmeasured: every language of the script; other scripts: every language of theirs (Japanese has no other).
    assert neighbours("ca") is None and identifier_candidates("ca", "neighbours") == same_script_languages("ca")
    assert identifier_candidates("ja", "neighbours") == {"ja"}
    assert identifier_candidates("ru", "neighbours") >= {"ru", "uk", "bg"}
    with pytest.raises(ValidationError, match="neighbours"):
        LanguageCheckParams(candidates=["en", "fr", "es"])


def test_every_language_of_the_script_finds_a_neighbour_the_table_leaves_out() -> None:
    # Catalan is no measured neighbour of French: its function words keep it out by default, and with
    # `candidates: script` lingua can choose it too.
    text = "Calculem la suma dels dos nombres i després la dividim per dos per obtenir la mitjana."
    assert not LanguageJudge().judge_span(text, "fr").in_lang
    assert not LanguageJudge(LanguageCheckParams(candidates="script")).judge_span(text, "fr").in_lang


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


def test_sentences_are_cut_at_sentence_and_line_ends() -> None:
    parts = sentences("un deux. trois quatre cinq six\nsept : huit neuf ; fin !")
    assert [part.words for part in parts] == [["un", "deux"], ["trois", "quatre", "cinq", "six"], ["sept"],
                                             ["huit", "neuf"], ["fin"]]  # fmt: skip
    assert parts[1].text == "trois quatre cinq six" and parts[1].letters == 18
    assert [part.text for part in sentences("まず計算します。次に確認します！")] == [
        "まず計算します",
        "次に確認します",
    ]


def test_wide_scripts_count_as_several_letters() -> None:
    # A Han character carries about three English letters, kana and Hangul one and a half to two.
    assert count_letters("abc") == 3
    assert count_letters("求和") == 6
    assert count_letters("すう") == 3
    assert count_letters("구하") == 4
    # One Chinese sentence is judged: nine characters were nine "letters", under the old 20 to judge anything.
    assert count_letters(strip_non_language("求方程 $x^2-5x+6=0$ 的两个根之和。")) == 27


def test_a_change_of_language_between_two_sentences_is_a_boundary(judge: LanguageJudge) -> None:
    french = "Nous calculons d'abord le nombre d'œufs qui restent chaque jour."
    english = "Then we multiply the remaining eggs by the price of one egg."
    mixed = judge.judge_span(f"{french} {english}", "fr")
    assert 0.4 < mixed.share < 0.6 and not mixed.in_lang
    assert judge.judge_span(french, "fr").share == 1.0


def test_short_sentences_whose_evidence_agrees_add_up(judge: LanguageJudge) -> None:
    # Each of these English fragments is too short for lingua to count against French on its own; together they do.
    fragments = "Okay. Wait. Hmm, right. Let me see. Fine. So yes."
    assert not judge.judge_span(f"Nous avons deux nombres. {fragments}", "fr").in_lang
    # Short kanji-only lines in Japanese (headings) are no evidence of Chinese; five Han characters without kana are.
    assert judge.judge_span("解答\n三と四を足すと七になります。\n検算\n七から四を引くと三です。", "ja").in_lang
    assert not judge.judge_span("三と四を足すと七になります。\n两数之和等于七。", "ja").in_lang


def test_function_words_vote_only_where_the_words_belong_to_one_language() -> None:
    vocabulary = distinctive_words()
    assert "que" not in vocabulary  # French, Spanish, Portuguese and Catalan share it: evidence for none
    assert vocabulary["uma"] == {"pt"} and vocabulary["dels"] == {"ca"} and vocabulary["the"] == {"en"}
    assert vocabulary["yang"] == {"id", "ms"}  # nearly the same words: they vote together, lingua tells them apart

    def vote(text: str, lang: str | None = None) -> set[str] | None:
        return function_word_vote(function_word_hits(text.split()), lang)

    assert vote("nous avons donc une solution pour cette équation") == {"fr"}
    assert vote("los números del problema son enteros y por eso") == {"es"}
    assert vote("ela tem uma bola e não tem outra") == {"pt"}  # Portuguese words never vote Spanish
    assert vote("the value of this sum is what we need") == {"en"}
    assert vote("nous avons the value") is None
    assert vote("solution") is None
    # One word is enough to confirm the expected language when nothing else speaks, never to show another one.
    assert vote("la valeur de la somme", "fr") is None  # `la`, `de`: shared
    assert vote("donc la somme", "fr") == {"fr"}
    assert vote("donc la somme", "es") is None
    assert set(FUNCTION_WORDS) >= {"en", "fr", "es", "de", "it", "pt", "ca", "nl"}


def test_simplified_characters_are_chinese_however_short(judge: LanguageJudge) -> None:
    assert {"这", "们", "个", "为", "设", "值"} <= SIMPLIFIED_ONLY
    assert not judge.judge_span("设 $x=2$，求 $x^2$ 的值。", "ja").in_lang  # 设/設, 值/値
    assert judge.judge_span("设 $x=2$，求 $x^2$ 的值。", "zh").in_lang


def test_share_is_graded_for_the_reward(judge: LanguageJudge) -> None:
    french = "Nous cherchons la valeur de la somme des deux nombres donnés dans cet énoncé. " * 3
    english = "We now look for the value of the sum of the two numbers given in the statement. " * 3
    half = judge.judge(f"<think>{french}{english}</think>", "fr")
    assert 0.3 < half.think_share < 0.7
    assert not half.think_in_lang
    assert judge.judge(f"<think>{french}</think>", "fr").think_share == 1.0
    assert judge.judge(f"<think>{english}</think>", "fr").think_share == 0.0


def test_thresholds_come_from_params() -> None:
    text = "<think>Nous calculons la somme des deux nombres. We then check the sum carefully.</think>"
    assert not LanguageJudge().judge(text, "fr").think_in_lang
    lenient = LanguageJudge(LanguageCheckParams(min_target_share=0.4))
    assert lenient.judge(text, "fr").think_in_lang
    too_short_to_judge = LanguageJudge(LanguageCheckParams(min_letters=500))
    assert too_short_to_judge.judge(text, "fr").think_in_lang
    # One Chinese sentence of five Han characters without kana: Chinese by default, too short with a higher bar.
    chinese = "<think>まず計算します。三加四得七。</think>"
    assert not LanguageJudge().judge(chinese, "ja").think_in_lang
    assert LanguageJudge(LanguageCheckParams(min_han_letters=30)).judge(chinese, "ja").think_in_lang
    # A one-word English reasoning, lingua's call by log-odds 1.5: English by default, not when more is asked.
    english = "<think>Integrate: $\\int_0^1 x \\, dx$.</think>"
    assert not LanguageJudge().judge(english, "es").think_in_lang
    assert LanguageJudge(LanguageCheckParams(min_other_log_odds=2.0)).judge(english, "es").think_in_lang


# --- real text: PolyMath and MGSM extracts (tests/fixtures/language/README.md) --------------------------------------


def _polymath() -> dict[tuple[str, str], str]:
    """(problem, lang) -> question; the problem is `level-index`."""
    records = [json.loads(line) for line in (FIXTURES / "polymath.jsonl").read_text(encoding="utf-8").splitlines()]
    found = {}
    for record in records:
        level, lang, index = record["id"].split("-")
        found[(f"{level}-{index}", lang)] = record["question"]
    return found


def _mgsm() -> dict[tuple[str, str], str]:
    found = {}
    for line in (FIXTURES / "mgsm.tsv").read_text(encoding="utf-8").splitlines():
        lang, row, question, _answer = line.split("\t")
        found[(f"mgsm-{row}", lang)] = question
    return found


REAL = _polymath() | _mgsm()
PROBLEMS = sorted({problem for problem, _ in REAL})
# (language of the text, requested language): a neighbour, a Chinese or Korean text for Japanese, English.
WRONG = [("pt", "es"), ("it", "es"), ("fr", "es"), ("pt", "fr"), ("es", "fr"), ("zh", "ja"), ("ko", "ja"),
         ("ja", "zh"), ("es", "pt"), ("en", "ja"), ("en", "fr"), ("en", "es"), ("en", "de")]  # fmt: skip


def test_the_extracts_hold_every_language_the_tests_need() -> None:
    assert len(PROBLEMS) == 13
    assert {lang for _, lang in REAL} == {"en", "ja", "fr", "es", "pt", "it", "zh", "ko", "de"}


@pytest.mark.parametrize(("problem", "lang"), sorted(REAL), ids=[f"{p}-{lang}" for p, lang in sorted(REAL)])
def test_real_questions_are_in_their_language_as_reasoning_and_as_answer(
    problem: str, lang: str, judge: LanguageJudge
) -> None:
    question = REAL[(problem, lang)]
    assert judge.judge(f"<think>{question}</think>", lang).think_in_lang
    assert judge.judge(f"<think></think>{question}", lang).answer_in_lang


@pytest.mark.parametrize(("written", "asked"), WRONG, ids=[f"{w}-for-{a}" for w, a in WRONG])
def test_real_questions_in_another_language_are_not(written: str, asked: str, judge: LanguageJudge) -> None:
    texts = {p: REAL[(p, written)] for p in PROBLEMS if (p, written) in REAL and (p, asked) in REAL}
    accepted = [p for p, text in texts.items() if judge.judge(f"<think>{text}</think>", asked).think_in_lang]
    # One-line problems ("Find $I=...$", "Encontre a antiderivada: $...$") hold a word or two: the judge may take
    # them for the target; everything longer must be caught.
    one_liners = [p for p, text in texts.items() if len(sentences(strip_non_language(text))[0].words) <= 2]
    assert texts and set(accepted) <= set(one_liners), accepted
