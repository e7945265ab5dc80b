"""The grpo_data@{lang} stage: GRPO's prompts as the mixture of grpo.datasets. The recipe's one dataset passes through
unchanged; a medical set fills its share (a seeded sample, or replayed when its share asks for more than it holds),
interleaved with the math problems, each problem carrying its domain."""

from __future__ import annotations

from collections import Counter

import pytest

from budget_alignment import paths
from budget_alignment.errors import StageError
from budget_alignment.records import GrpoProblem, read_records, write_records
from budget_alignment.train import grpo_data
from test_train_helpers import problems, tiny_params


@pytest.fixture
def normalized(tmp_path, monkeypatch):
    """The normalized math and medicine_train problems in ja and fr, as the data stages write them."""
    monkeypatch.chdir(tmp_path)
    for lang in ("ja", "fr"):
        for name in ("math", "medicine_train"):
            write_records(paths.normalized(name, lang), problems(name, lang))
    return tmp_path


def mixture(**weights: float):
    return {"datasets": {"math": {"weight": weights.get("math", 1.0), "domain": "math"},
                         "medicine_train": {"weight": weights.get("medicine", 0.0), "domain": "medical"}}}  # fmt: skip


# (sizes, weights, counts)
COUNTS = [
    ([40], [1.0], [40]),
    ([40, 16], [1.0, 0.0], [40, 0]),
    ([40, 16], [0.75, 0.25], [40, 13]),  # a quarter of 53: a sample of the 16
    ([40, 16], [0.5, 0.5], [40, 40]),  # half of 80: the 16 replayed
    ([40, 16], [0.0, 1.0], [0, 16]),  # the first dataset with a weight is taken whole
    ([40, 16], [3, 1], [40, 13]),  # weights are relative
]


@pytest.mark.parametrize(("sizes", "weights", "counts"), COUNTS)
def test_mixture_counts(sizes, weights, counts):
    assert grpo_data.mixture_counts(sizes, weights) == counts


def test_the_recipe_passes_its_math_problems_through_unchanged(normalized):
    params = tiny_params(grpo=mixture())
    assert grpo_data.gather_grpo_problems(params, "ja") == {"math": 40}
    written = read_records(paths.grpo_problems("ja"), GrpoProblem)
    assert [p.model_dump(exclude={"domain"}) for p in written] == [p.model_dump() for p in problems("math", "ja")]
    assert {p.domain for p in written} == {"math"}


def test_a_medical_share_replays_medical_exemplars_among_the_math_problems(normalized):
    params = tiny_params(grpo=mixture(math=0.75, medicine=0.25))
    assert grpo_data.gather_grpo_problems(params, "ja") == {"math": 40, "medicine_train": 13}
    written = read_records(paths.grpo_problems("ja"), GrpoProblem)
    medical = [p for p in written if p.domain == "medical"]
    assert len(medical) / len(written) == pytest.approx(0.25, abs=0.01)
    assert all(p.dataset == "medicine_train" and p.answer_type == "choice" and p.choices for p in medical)
    assert len({p.id for p in medical}) == 13  # a sample of 13 distinct exemplars
    # Spread through the prompts, not appended: each quarter of the file holds some.
    quarters = Counter(index * 4 // len(written) for index, p in enumerate(written) if p.domain == "medical")
    assert sorted(quarters) == [0, 1, 2, 3]
    # The same exemplars in every language, so that the languages' runs stay comparable.
    grpo_data.gather_grpo_problems(params, "fr")
    french = read_records(paths.grpo_problems("fr"), GrpoProblem)
    assert [p.id for p in french] == [p.id for p in written]


def test_a_share_larger_than_the_set_replays_it(normalized):
    grpo_data.gather_grpo_problems(tiny_params(grpo=mixture(math=0.5, medicine=0.5)), "ja")
    medical = Counter(p.id for p in read_records(paths.grpo_problems("ja"), GrpoProblem) if p.domain == "medical")
    assert sum(medical.values()) == 40 and len(medical) == 16 and set(medical.values()) == {2, 3}


def test_a_domain_takes_its_answer_kind(normalized):
    params = tiny_params(grpo={"datasets": {"math": {"weight": 1.0, "domain": "medical"}}})
    with pytest.raises(StageError, match=r"grpo\.datasets\.math: domain medical takes choice answers"):
        grpo_data.gather_grpo_problems(params, "ja")


def test_the_mixture_names_datasets_with_role_grpo():
    from budget_alignment.params import Params

    raw = tiny_params().model_dump(mode="json")
    raw["grpo"]["datasets"] = {"chains": {"weight": 1.0, "domain": "math"}}
    with pytest.raises(ValueError, match=r"grpo\.datasets\.chains: dataset .chains. has role .sft., expected .grpo."):
        Params.model_validate(raw)
