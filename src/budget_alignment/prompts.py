"""The one place where a `Problem` becomes a model's chat: SFT, GRPO and evaluation all use these functions.

Every prompt ends in an opened `<think>\\n` block, whatever the chat template: DeepSeek-R1-Distill's template
pre-fills it in the generation prompt, and doing the same for every other model makes completions uniform
(reasoning, `</think>`, then the answer) for training targets, rewards and metrics alike. Training targets are
built as prompt + completion text rather than as an assistant message, because R1-Distill's template drops
everything before `</think>` from assistant turns: the reasoning would silently vanish from the SFT data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from budget_alignment.languages import language_name
from budget_alignment.params import PromptParams
from budget_alignment.records import Problem

THINK_OPEN = "<think>\n"
THINK_CLOSE = "</think>"

# The instruction asks for the reasoning, not only the answer, in the user's language.
INSTRUCTIONS = {
    "en": "Think step by step in English, then give your final answer in \\boxed{}.",
    "ja": "日本語で順を追って考え、最終的な答えを \\boxed{} の中に書いてください。",
    "fr": "Réfléchis étape par étape en français, puis donne ta réponse finale dans \\boxed{}.",
    "es": "Razona paso a paso en español y luego da tu respuesta final dentro de \\boxed{}.",
}
CHOICE_INSTRUCTIONS = {
    "en": "Think step by step in English, then give the letter of the correct option in \\boxed{}.",
    "ja": "日本語で順を追って考え、正しい選択肢の記号を \\boxed{} の中に書いてください。",
    "fr": "Réfléchis étape par étape en français, puis donne la lettre de la bonne option dans \\boxed{}.",
    "es": "Razona paso a paso en español y luego da la letra de la opción correcta dentro de \\boxed{}.",
}
# A language without a written instruction gets the English one naming it ("... in German ...").
FALLBACK_INSTRUCTION = "Think step by step in {language}, then give your final answer in \\boxed{}."
FALLBACK_CHOICE_INSTRUCTION = (
    "Think step by step in {language}, then give the letter of the correct option in \\boxed{}."
)

# Qi et al.: opening the reasoning with a sentence in the target language keeps it there.
THINK_PREFIXES = {
    "en": "Let me think step by step.",
    "ja": "まず、日本語で順を追って考えます。",
    "fr": "Je vais réfléchir étape par étape en français.",
    "es": "Voy a razonar paso a paso en español.",
}


def instruction(lang: str, answer_type: str) -> str:
    if answer_type == "choice":
        table, fallback = CHOICE_INSTRUCTIONS, FALLBACK_CHOICE_INSTRUCTION
    else:
        table, fallback = INSTRUCTIONS, FALLBACK_INSTRUCTION
    return table.get(lang) or fallback.replace("{language}", language_name(lang))


def think_prefix(lang: str) -> str:
    return THINK_PREFIXES.get(lang) or f"I will reason in {language_name(lang)}."


def question_text(problem: Problem) -> str:
    """The question, with its lettered choices for a multiple-choice problem."""
    if not problem.choices:
        return problem.question
    options = "\n".join(f"{letter}. {text}" for letter, text in problem.choices.items())
    return f"{problem.question}\n\n{options}"


def user_message(problem: Problem, lang: str | None = None) -> str:
    lang = lang or problem.lang
    return f"{question_text(problem)}\n\n{instruction(lang, problem.answer_type)}"


def messages(problem: Problem, lang: str | None = None) -> list[dict[str, str]]:
    return [{"role": "user", "content": user_message(problem, lang)}]


def without_duplicate_bos(tokenizer: Any, text: str) -> str:
    """A rendered chat prompt without its leading BOS token when the tokenizer adds one by itself.

    Chat templates such as R1-Distill's write `{{bos_token}}` into the text, and TRL tokenizes text prompts with the
    special tokens on: every sequence would start with two BOS tokens.
    """
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return text[len(bos) :]
    return text


def prompt_token_ids(tokenizer: Any, text: str) -> list[int]:
    """A rendered chat prompt as token ids, exactly as the chat template wrote it: the template writes any BOS token
    itself, so the tokenizer adds none (else vLLM and `generate` would see two)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generation_prompt(tokenizer: Any, problem: Problem, settings: PromptParams, lang: str | None = None) -> str:
    """The text a model continues: its chat template's generation prompt, then an opened think block."""
    lang = lang or problem.lang
    text = tokenizer.apply_chat_template(messages(problem, lang), tokenize=False, add_generation_prompt=True)
    # R1-Distill's template already ends with "<think>\n"; never open the block twice.
    if not text.rstrip().endswith(THINK_OPEN.strip()):
        text += THINK_OPEN
    elif not text.endswith("\n"):
        text += "\n"
    if settings.think_prefix:
        text += think_prefix(lang) + "\n"
    return text


@dataclass(frozen=True)
class WorkedSolution:
    reasoning: str
    final: str


def split_solution(solution: str) -> WorkedSolution:
    """A worked solution's last paragraph is its answer sentence (with `\\boxed{}`); the rest is reasoning."""
    paragraphs = [p.strip() for p in solution.strip().split("\n\n") if p.strip()]
    if len(paragraphs) < 2:
        raise ValueError("a worked solution needs reasoning paragraphs and a final answer paragraph")
    return WorkedSolution(reasoning="\n\n".join(paragraphs[:-1]), final=paragraphs[-1])


def completion_text(reasoning: str, final: str, lang: str, settings: PromptParams, eos_token: str) -> str:
    """The training target after `generation_prompt`: reasoning, `</think>`, the answer, end of turn."""
    if settings.think_prefix:
        reasoning = f"{think_prefix(lang)}\n{reasoning}"
    return f"{reasoning}\n{THINK_CLOSE}\n\n{final}{eos_token}"


def training_example(
    tokenizer: Any, problem: Problem, settings: PromptParams, *, reasoning_from: Problem | None = None
) -> dict[str, str]:
    """A prompt/completion pair; the loss covers the completion only (reasoning included).

    `reasoning_from` takes the worked solution from another language's record of the same problem (the tiny
    base's English reasoning prior: the question in `problem.lang`, the reasoning in English, the answer
    sentence in the question's language).
    """
    if problem.solution is None:
        raise ValueError(f"problem {problem.id} ({problem.lang}) has no worked solution to train on")
    own = split_solution(problem.solution)
    reasoning = (
        split_solution(reasoning_from.solution).reasoning
        if reasoning_from and reasoning_from.solution
        else own.reasoning
    )
    return {
        "prompt": generation_prompt(tokenizer, problem, settings),
        "completion": completion_text(reasoning, own.final, problem.lang, settings, tokenizer.eos_token or ""),
    }
