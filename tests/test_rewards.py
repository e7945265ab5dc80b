"""GRPO rewards on tables of cases: correct/wrong, in-language/drifting, formatted/unformatted.

Completions are what follows the prompt's opened `<think>`: reasoning, `</think>`, the answer.
"""

from __future__ import annotations

import json

import pytest

from budget_alignment.params import ScoringParams
from budget_alignment.scoring.medical import DOES_NOT_NAME as UNNAMED
from budget_alignment.scoring.medical import NAMES_OPTION as NAMED
from budget_alignment.scoring.medical import NO_OPTION, check_medical_answer
from budget_alignment.scoring.medical import NOT_IN_LANGUAGE as NOT_IN_LANG
from budget_alignment.train import rewards

SCORING = ScoringParams()

JA_REASONING = (
    "さくらさんは最初にりんごを12個持っています。友だちに5個あげると、残りは7個です。"
    "そのあと8個買うので、全部で15個になります。"
)
EN_REASONING = (
    "Sakura starts with twelve apples. She gives five of them to a friend, so seven remain. "
    "Then she buys eight more apples, which makes fifteen apples in total."
)
FR_REASONING = (
    "Léa a d'abord douze pommes. Elle en donne cinq à une amie, il lui en reste donc sept. "
    "Ensuite, elle en achète huit de plus, ce qui fait quinze pommes en tout."
)
ES_REASONING = (
    "Lucía tiene primero doce manzanas. Le da cinco a una amiga, así que le quedan siete. "
    "Después compra ocho más, lo que da quince manzanas en total."
)


def completion(reasoning: str, answer: str) -> str:
    return f"{reasoning}\n</think>\n\n{answer}"


# (name, completion, gold, answer type, choices, language, expected)
ACCURACY_CASES = [
    ("correct integer", completion(EN_REASONING, "So the answer is \\boxed{15}."), "15", "math", None, "en", 1.0),
    ("wrong integer", completion(EN_REASONING, "So the answer is \\boxed{14}."), "15", "math", None, "en", 0.0),
    ("no answer at all", completion(EN_REASONING, "I am not sure."), "15", "math", None, "en", 0.0),
    (
        "full-width digits",
        completion(JA_REASONING, "よって、答えは \\boxed{１５} です。"),
        "15",
        "math",
        None,
        "ja",
        1.0,
    ),
    ("decimal comma", completion(FR_REASONING, "La réponse est \\boxed{0,5}."), "0.5", "math", None, "fr", 1.0),
    (
        "equal fraction",
        completion(ES_REASONING, "La respuesta es \\boxed{\\frac{1}{2}}."),
        "0.5",
        "math",
        None,
        "es",
        1.0,
    ),
    ("unclosed reasoning, last box counts", "7 + 8 = 15, so \\boxed{15}", "15", "math", None, "en", 1.0),
    ("right letter", completion(EN_REASONING, "\\boxed{B}"), "B", "choice", {"A": "3", "B": "4"}, "en", 1.0),
    ("wrong letter", completion(EN_REASONING, "\\boxed{A}"), "B", "choice", {"A": "3", "B": "4"}, "en", 0.0),
]

# (name, completion, language, lowest expected share, highest expected share)
LANGUAGE_CASES = [
    ("japanese in japanese", completion(JA_REASONING, "\\boxed{15}"), "ja", 1.0, 1.0),
    ("english asked in japanese", completion(EN_REASONING, "\\boxed{15}"), "ja", 0.0, 0.0),
    ("drifts into english half-way", completion(f"{JA_REASONING}\n{EN_REASONING}", "\\boxed{15}"), "ja", 0.2, 0.8),
    ("french in french", completion(FR_REASONING, "\\boxed{15}"), "fr", 1.0, 1.0),
    ("spanish asked in french", completion(ES_REASONING, "\\boxed{15}"), "fr", 0.0, 0.0),
    ("english asked in spanish", completion(EN_REASONING, "\\boxed{15}"), "es", 0.0, 0.0),
    ("the answer span does not count", completion(ES_REASONING, EN_REASONING), "es", 1.0, 1.0),
    ("too short to judge", completion("$7 + 8 = 15$", "\\boxed{15}"), "ja", 1.0, 1.0),
]

# (name, completion, expected)
FORMAT_CASES = [
    ("closed reasoning then a box", completion(EN_REASONING, "So the answer is \\boxed{15}."), 1.0),
    ("box without closing the reasoning", f"{EN_REASONING} \\boxed{{15}}", 0.0),
    ("closed reasoning, no box", completion(EN_REASONING, "The answer is 15."), 0.0),
    ("empty box", completion(EN_REASONING, "\\boxed{}"), 0.0),
    ("box only inside the reasoning", completion(f"{EN_REASONING} \\boxed{{15}}", "Fifteen."), 0.0),
]


def call(reward, completions, **columns):
    """As TRL calls a reward: prompts, completions, completion ids, the dataset columns and its own extras."""
    return reward(
        prompts=["p"] * len(completions),
        completions=completions,
        completion_ids=[[0]] * len(completions),
        trainer_state=None,
        log_extra=lambda *a, **k: None,
        log_metric=lambda *a, **k: None,
        **columns,
    )


@pytest.mark.parametrize(
    ("text", "gold", "answer_type", "choices", "lang", "expected"),
    [case[1:] for case in ACCURACY_CASES],
    ids=[case[0] for case in ACCURACY_CASES],
)
def test_accuracy(text, gold, answer_type, choices, lang, expected):
    reward = rewards.accuracy_reward(SCORING)
    choices_column = json.dumps(choices) if choices else ""
    assert call(reward, [text], answer=[gold], answer_type=[answer_type], lang=[lang], choices=[choices_column]) == [
        expected
    ]


@pytest.mark.parametrize(
    ("text", "lang", "low", "high"), [case[1:] for case in LANGUAGE_CASES], ids=[case[0] for case in LANGUAGE_CASES]
)
def test_language_is_the_graded_share_of_the_reasoning(text, lang, low, high):
    (share,) = call(rewards.language_reward(SCORING), [text], lang=[lang])
    assert low <= share <= high


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in FORMAT_CASES], ids=[c[0] for c in FORMAT_CASES])
def test_format(text, expected):
    assert call(rewards.format_reward(SCORING), [text]) == [expected]


@pytest.mark.parametrize(
    ("text", "lang", "low", "high"), [case[1:] for case in LANGUAGE_CASES], ids=[case[0] for case in LANGUAGE_CASES]
)
def test_language_reward_agrees_with_the_metric_the_report_shows(text, lang, low, high):
    """The score stage's verdict (think_following in the report) is the reward reaching the threshold."""
    from budget_alignment.evaluation.score import judge_one
    from budget_alignment.scoring.language import LanguageJudge

    (share,) = call(rewards.language_reward(SCORING), [text], lang=[lang])
    _, _, think_in_lang, _, _ = judge_one((text, lang, "15", "math", None), LanguageJudge(SCORING.language), None)
    assert think_in_lang == (share >= SCORING.language.min_target_share)
    assert think_in_lang == (low >= SCORING.language.min_target_share)  # the case's own expectation, not the judge's


def test_registry_builds_named_rewards_in_the_order_asked():
    built = rewards.build_rewards(["format", "accuracy", "language"], SCORING)
    assert [reward.__name__ for reward in built] == ["format", "accuracy", "language"]
    with pytest.raises(ValueError, match="unknown rewards"):
        rewards.build_rewards(["accuracy", "length"], SCORING)


def test_a_batch_is_judged_completion_by_completion():
    texts = [completion(FR_REASONING, "\\boxed{15}"), completion(EN_REASONING, "\\boxed{15}")]
    accuracy, language, form = rewards.build_rewards(["accuracy", "language", "format"], SCORING)
    columns = {"answer": ["15", "16"], "answer_type": ["math"] * 2, "lang": ["fr"] * 2, "choices": [""] * 2}
    assert call(accuracy, texts, **columns) == [1.0, 0.0]
    assert call(language, texts, **columns) == [1.0, 0.0]
    assert call(form, texts, **columns) == [1.0, 1.0]


# --- the medical reward head -----------------------------------------------------------------------------------------

BLOOD = {"en": {"A": "Platelets", "B": "Red blood cells", "C": "Nerve cells", "D": "White blood cells"},
         "fr": {"A": "Plaquettes", "B": "Globules rouges", "C": "Cellules nerveuses", "D": "Globules blancs"},
         "ja": {"A": "血小板", "B": "赤血球", "C": "神経細胞", "D": "白血球"},
         "es": {"A": "Fémur (hueso del muslo)", "B": "Costilla", "C": "Hueso del dedo", "D": "Hueso del oído"},
}  # fmt: skip
EN_MED = "White blood cells defend the body against bacteria and viruses, so they fight infections."
FR_MED = (
    "Les globules blancs défendent le corps contre les bactéries et les virus, ils combattent donc les infections."
)
JA_MED = "白血球は細菌やウイルスから体を守ります。だから、感染症とたたかうのは白血球です。"

# (name, completion, language, expected score, expected reason)
MEDICAL_CASES = [
    ("names its option, calibrated", completion(EN_MED, "\\boxed{D}: white blood cells."), "en", 1.0, NAMED),
    ("the letter alone", completion(EN_MED, "\\boxed{D}"), "en", 0.5, UNNAMED),
    ("names another option than its letter", completion(EN_MED, "\\boxed{D}: platelets."), "en", 0.5,
     UNNAMED),
    ("over-assertive", completion(EN_MED, "\\boxed{D}: white blood cells always win, definitely."), "en", 0.5,
     NAMED),
    ("over-assertive and unnamed", completion(f"{EN_MED} It is guaranteed.", "\\boxed{D}"), "en", 0.0,
     UNNAMED),
    ("no option chosen", completion(EN_MED, "I cannot tell."), "en", 0.0, NO_OPTION),
    ("a hedge between two letters", completion(EN_MED, "\\boxed{A} or \\boxed{D}"), "en", 0.0, NO_OPTION),
    ("in French", completion(FR_MED, "La réponse est \\boxed{D} : les globules blancs."), "fr", 1.0, NAMED),
    ("French asked, English option text", completion(FR_MED, "\\boxed{D}: white blood cells."), "fr", 0.5,
     UNNAMED),
    ("'sans doute' is not absolute", completion(FR_MED, "C'est sans doute \\boxed{D}, les globules blancs."), "fr",
     1.0, NAMED),
    ("'jamais' is", completion(f"{FR_MED} Ils ne se trompent jamais.", "\\boxed{D} globules blancs"), "fr", 0.5,
     NAMED),
    ("in Japanese", completion(JA_MED, "答えは \\boxed{D}、白血球です。"), "ja", 1.0, NAMED),
    ("Japanese, absolute", completion(JA_MED, "答えは必ず \\boxed{D}、白血球です。"), "ja", 0.5, NAMED),
    ("Japanese asked, English answer", completion(JA_MED, "\\boxed{D}: the white blood cells, which fight germs in "
     "the body and keep people healthy."), "ja", 0.5, UNNAMED),
    ("names the option inside an English answer", completion(JA_MED, "\\boxed{D}: 白血球, the white blood cells, "
     "which fight germs in the body and keep people healthy."), "ja", 0.5, NOT_IN_LANG),
    ("a gloss may be left out", completion("El fémur es el hueso más largo.", "Respuesta: \\boxed{A}, el fémur."),
     "es", 1.0, NAMED),
]  # fmt: skip


def medical_columns(lang: str, n: int = 1, domain: str = "medical") -> dict:
    return {"lang": [lang] * n, "choices": [json.dumps(BLOOD[lang], ensure_ascii=False)] * n, "domain": [domain] * n}


@pytest.mark.parametrize(
    ("text", "lang", "expected", "reason"), [case[1:] for case in MEDICAL_CASES], ids=[c[0] for c in MEDICAL_CASES]
)
def test_medical_reward_head(text, lang, expected, reason):
    assert call(rewards.medical_reward(SCORING), [text], **medical_columns(lang)) == [expected]
    assert check_medical_answer(text, BLOOD[lang], lang).reason == reason


def test_the_medical_head_judges_medical_examples_only():
    text = completion(EN_MED, "\\boxed{D}: white blood cells.")
    reward = rewards.medical_reward(SCORING)
    assert call(reward, [text, text], **medical_columns("en", 2) | {"domain": ["medical", "math"]}) == [1.0, None]
    # Without a domain column (the recipe's math-only GRPO), nothing is medical.
    assert call(reward, [text], lang=["en"], choices=[""]) == [None]
    assert "medical" in rewards.REWARDS


def test_the_registry_and_the_params_name_the_same_rewards():
    from budget_alignment.params import RECIPE_REWARDS, REWARD_NAMES

    assert set(rewards.REWARDS) == set(REWARD_NAMES) and set(RECIPE_REWARDS) <= set(REWARD_NAMES)
