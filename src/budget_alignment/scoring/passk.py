"""pass@k and the rates the report shows, as small pure functions (fractions in [0, 1])."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): the chance that k of n samples, c of them correct, hold one.

    `1 - prod(1 - k / arange(n - c + 1, n + 1))`, which is `1 - C(n - c, k) / C(n, k)` without huge numbers.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k samples (1 <= k <= n), got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (samples n, correct samples c)."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("pass@k of no problems")
    return float(np.mean(values))


def rate(flags: Sequence[bool]) -> float:
    """The share of True (following, format, ...) among samples; 0.0 for no samples."""
    return sum(flags) / len(flags) if flags else 0.0


def joint_rate(first: Sequence[bool], second: Sequence[bool]) -> float:
    """The share of samples where both hold, e.g. correct and following."""
    if len(first) != len(second):
        raise ValueError(f"joint rate of sequences of different lengths ({len(first)} and {len(second)})")
    return rate([a and b for a, b in zip(first, second, strict=True)])
