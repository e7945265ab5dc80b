"""prompts.py: one chat format for SFT, GRPO and evaluation, with R1-Distill's template quirks handled."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from budget_alignment import prompts
from budget_alignment.params import PromptParams
from budget_alignment.records import Problem
from conftest import FIXTURES

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_with(template: str, eos: str) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, eos: 1, "<bos>": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), eos_token=eos, bos_token="<bos>"
    )
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture
def r1():
    return tokenizer_with((FIXTURES / "deepseek_r1_distill_chat_template.jinja").read_text(), "<｜end▁of▁sentence｜>")


@pytest.fixture
def chatml():
    return tokenizer_with(CHATML, "<|im_end|>")


def problem(lang="ja", **changes) -> Problem:
    record = {
        "id": "chains-001",
        "dataset": "chains",
        "lang": lang,
        "question": "りんごは何個ですか。",
        "answer": "15",
        "answer_type": "math",
        "solution": "12 - 5 = 7 です。\n\n7 + 8 = 15 です。\n\nよって、答えは \\boxed{15} です。",
    }
    return Problem.model_validate(record | changes)


def test_r1_template_prefills_think_and_it_is_not_opened_twice(r1):
    text = prompts.generation_prompt(r1, problem(), PromptParams())
    assert text.startswith("<bos><｜User｜>りんごは何個ですか。")
    assert text.endswith("<｜Assistant｜><think>\n")
    assert text.count("<think>") == 1


def test_chatml_template_gets_the_same_opened_think_block(chatml):
    text = prompts.generation_prompt(chatml, problem(), PromptParams())
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert "日本語で順を追って考え" in text


def test_r1_template_would_drop_the_reasoning_of_an_assistant_turn(r1):
    """Why training targets are prompt + completion text: the template keeps only what follows </think>."""
    rendered = r1.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nsecret steps\n</think>\n\nA"}],
        tokenize=False,
    )
    assert "secret steps" not in rendered
    example = prompts.training_example(r1, problem(), PromptParams())
    assert "12 - 5 = 7" in example["completion"]


def test_training_example_keeps_reasoning_then_answer_then_eos(chatml):
    example = prompts.training_example(chatml, problem(), PromptParams())
    assert example["prompt"].endswith("<think>\n")
    assert example["completion"] == (
        "12 - 5 = 7 です。\n\n7 + 8 = 15 です。\n</think>\n\nよって、答えは \\boxed{15} です。<|im_end|>"
    )


def test_reasoning_prior_takes_english_reasoning_and_the_local_answer_sentence(chatml):
    english = problem(lang="en", question="How many apples?", solution="12 - 5 = 7.\n\nSo the answer is \\boxed{15}.")
    example = prompts.training_example(chatml, problem(), PromptParams(), reasoning_from=english)
    assert example["completion"].startswith("12 - 5 = 7.\n</think>")
    assert "よって、答えは \\boxed{15} です。" in example["completion"]
    assert "りんごは何個ですか。" in example["prompt"]


def test_think_prefix_opens_the_reasoning_in_the_target_language(chatml):
    settings = PromptParams(think_prefix=True)
    assert prompts.generation_prompt(chatml, problem(lang="fr"), settings).endswith(
        "<think>\nJe vais réfléchir étape par étape en français.\n"
    )
    example = prompts.training_example(chatml, problem(), settings)
    assert example["completion"].startswith(prompts.THINK_PREFIXES["ja"] + "\n12 - 5")


def test_choices_are_listed_with_their_letters_and_a_letter_instruction():
    choice = problem(
        lang="es",
        question="¿Cuánto es 2 + 2?",
        answer="B",
        answer_type="choice",
        choices={"A": "3", "B": "4"},
        solution=None,
    )
    message = prompts.user_message(choice)
    assert "¿Cuánto es 2 + 2?\n\nA. 3\nB. 4\n\n" in message
    assert "letra de la opción correcta" in message


def test_languages_without_a_written_instruction_are_named_in_english():
    assert "in German" in prompts.instruction("de", "math")
    with pytest.raises(ValueError, match="unknown language code"):
        prompts.instruction("xx", "math")


def test_a_solution_without_an_answer_paragraph_is_rejected(chatml):
    with pytest.raises(ValueError, match="final answer paragraph"):
        prompts.training_example(chatml, problem(solution="only one paragraph \\boxed{15}"), PromptParams())
