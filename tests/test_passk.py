"""pass@k against exact combinatorics, and the rates of the report."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from budget_alignment.scoring.passk import joint_rate, mean_pass_at_k, pass_at_k, rate


def exact_pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k samples drawn without replacement hold a correct one."""
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@st.composite
def samples(draw: st.DrawFn) -> tuple[int, int, int]:
    n = draw(st.integers(min_value=1, max_value=200))
    return n, draw(st.integers(min_value=0, max_value=n)), draw(st.integers(min_value=1, max_value=n))


@given(samples())
def test_pass_at_k_equals_the_exact_combinatorics(case: tuple[int, int, int]) -> None:
    n, c, k = case
    assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), abs=1e-9)


PASS_AT_K_CASES = [
    # (n, c, k, expected)
    (1, 0, 1, 0.0),
    (1, 1, 1, 1.0),
    (10, 0, 5, 0.0),
    (10, 10, 10, 1.0),
    (10, 1, 1, 0.1),
    (10, 3, 1, 0.3),
    (5, 2, 5, 1.0),  # n - c < k: every draw of 5 holds a correct sample
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (32, 4, 10, 1 - math.comb(28, 10) / math.comb(32, 10)),
]


@pytest.mark.parametrize(("n", "c", "k", "expected"), PASS_AT_K_CASES)
def test_pass_at_k_cases(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="pass@"):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_over_problems() -> None:
    assert mean_pass_at_k([(4, 1), (4, 3)], 1) == pytest.approx(0.5)
    assert mean_pass_at_k([(3, 2), (3, 1)], 2) == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], 1)


def test_rates() -> None:
    assert rate([True, False, True, True]) == 0.75
    assert rate([]) == 0.0
    assert joint_rate([True, True, False, False], [True, False, True, False]) == 0.25
    with pytest.raises(ValueError, match="different lengths"):
        joint_rate([True], [True, False])
